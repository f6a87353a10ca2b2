"""The scaling benchmark's model builders (scripts/benchlib/scale_models.py): a random LLaMA built in
ONNX runs in ONNX Runtime and is recognised as a transformer; repeating its decoder layers gives a deeper
model with its own weights per copy, saved and reloaded with external data."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from benchlib.scale_models import llama_parameters, random_llama, repeat_layers, save_external
from onnxq.analysis.structure import analyse

SHAPE = {"hidden": 32, "intermediate": 64, "heads": 4}


def _feed(batch=2, seq=12, vocab=100):
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, _feed())[0]


def _weights(model):
    return sum(v.const_value.size for name, v in model.graph.initializers.items() if "weight" in name)


def test_random_llama_runs_and_is_recognised(tmp_path):
    model = random_llama(**SHAPE, layers=3, vocab=100, max_seq=16)
    assert _weights(model) == llama_parameters(SHAPE["hidden"], SHAPE["intermediate"], 3, vocab=100)
    s = analyse(model)
    assert len(s.attentions) == 3 and len(s.mlps) == 3 and len(s.norms) == 7
    logits = _run(save_external(model, tmp_path / "m.onnx"))
    assert logits.shape == (2, 12, 100) and np.isfinite(logits).all()


@pytest.mark.parametrize("times", [1, 3])
def test_repeat_layers_adds_copies_with_their_own_weights(tmp_path, times):
    base = save_external(random_llama(**SHAPE, layers=2, vocab=100, max_seq=16), tmp_path / "base.onnx")
    deeper = repeat_layers(ir.load(base), times)
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert _weights(deeper) == _weights(ir.load(base)) + (times - 1) * 2 * layer
    assert len(analyse(deeper).attentions) == 2 * times
    path = save_external(deeper, tmp_path / f"x{times}.onnx")
    assert (tmp_path / f"x{times}.onnx.data").exists()
    out, ref = _run(path), _run(base)
    if times == 1:
        np.testing.assert_array_equal(out, ref)
    else:
        assert np.isfinite(out).all() and not np.allclose(out, ref)


def test_repeat_layers_runs_the_stack_again():
    # a 2-layer stack repeated twice computes what the 4-layer model with layers 2, 3 = layers 0, 1 computes
    four = random_llama(**SHAPE, layers=4, vocab=100, max_seq=16)
    inits = four.graph.initializers
    for name in list(inits):
        if name.startswith(("model.layers.2.", "model.layers.3.")):
            source = name.replace("layers.2.", "layers.0.").replace("layers.3.", "layers.1.")
            inits[name].const_value = ir.tensor(inits[source].const_value.numpy().copy(), name=name)
    two = random_llama(**SHAPE, layers=4, vocab=100, max_seq=16)
    drop = [n for n in two.graph if n.name.startswith(("/model/layers.2/", "/model/layers.3/"))]
    last = next(n for n in two.graph if n.name == "/model/layers.1/Add_1")
    final = next(n for n in two.graph if n.name == "/model/norm/Pow")
    readers = [(node, i) for node, i in drop[-1].outputs[0].uses() if node not in drop]
    for node, i in readers:
        node.replace_input_with(i, last.outputs[0])
    two.graph.remove(drop, safe=True)
    assert final.inputs[0] is last.outputs[0]
    deeper = repeat_layers(two, 2)
    sess = lambda m: ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess(deeper).run(None, _feed())[0], sess(four).run(None, _feed())[0], rtol=1e-5, atol=1e-5)
