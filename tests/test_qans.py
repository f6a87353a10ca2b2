"""qans: stabilised, clipped, INT8-quantized softmax inputs (with an exact exp table) on a BERT-style
attention layer with a padding mask: the documented bound, β calibration, masks, lint."""

import json
import math

import numpy as np
import onnx
import pytest

from builders import attention_model
from conftest import assert_lint_clean, run
from onnxq.api import quantize
from onnxq.ir.modelio import load_model
from onnxq.passes.nonlinear.qans import FIXED_POINT, choose_beta, exp_table

OPTS = {"batch_size": 8, "show_progress": False, "log": lambda *_: None}
SEQ = 8


def feeds(n=32, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), np.int64)
    mask[::2, 5:] = 0
    return {"hidden": (rng.normal(size=(n, SEQ, 16)) * 3).astype(np.float32), "attention_mask": mask}


def probs_model():
    """The attention layer with its softmax output as the graph output (so probabilities can be checked)."""
    model = attention_model(seq=SEQ)
    out = model.graph.output[0]
    out.name = "probs"
    del out.type.tensor_type.shape.dim[:]
    for d in ("N", 2, SEQ, SEQ):
        dim = out.type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    return model


def _fid(proto):
    return json.loads(load_model(proto).metadata_props["onnxq.fidelity"])


@pytest.mark.parametrize("exp", ["lut8", "dulut", "float"])
def test_modes_run_and_stay_close(exp):
    model = probs_model()
    out = quantize(model, feeds(), recipe=[{"qans": {"exp": exp}}], **OPTS)
    ops = [n.op_type for n in out.graph.node]
    assert ("Softmax" in ops) == (exp == "float")
    assert ops.count("QuantizeLinear") == 1 and "Exp" not in ops
    (entry,) = _fid(out)
    assert entry["function"] == "softmax" and entry["input_quantized"]
    beta = float(entry["method"].split("beta=")[1].split()[0])
    assert beta in (4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0)
    x = feeds(16, seed=3)
    ref, got = run(model, x)[0], run(out, x)[0]
    assert np.abs(got - ref).max() < 0.05
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=2e-3)


def test_bound_each_probability_within_exp_of_step():
    """Fixed β = 10, centred: INT8 step s = β/254; each probability within a factor e^(±s) of exact
    (for those not clipped), masked positions exactly 0."""
    model = probs_model()
    beta = 10.0
    out = quantize(model, feeds(), recipe=[{"qans": {"beta": beta}}], **OPTS)
    x = feeds(32, seed=4)
    ref, got = run(model, x)[0].astype(np.float64), run(out, x)[0].astype(np.float64)
    s = beta / 254
    keep = ref > 1e-3
    ratio = np.abs(np.log(got[keep] / ref[keep]))
    assert ratio.max() <= s + 2e-3, ratio.max()
    masked = np.broadcast_to(x["attention_mask"][:, None, None, :] == 0, got.shape)
    assert np.all(got[masked] == 0.0)
    (entry,) = _fid(out)
    assert entry["method"] == "qans beta=10 exp=lut8" and entry["max_steps"] < 255 * (math.exp(s) - 1)


def test_lint_clean_after_quantize():
    model = attention_model(seq=SEQ)
    out = quantize(model, feeds(), recipe=["quantize", "qans"], **OPTS)
    assert_lint_clean(out)
    q = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and "softmax" in n.name]
    assert len(q) == 1


def test_exp_table_and_beta_choice():
    scale = np.float32(5.0 / 127)
    table = exp_table(scale, 5.0)
    assert table[255] == 2 ** FIXED_POINT and table[0] == table[1] == 0
    codes = np.arange(2, 256) - 128
    np.testing.assert_allclose(table[2:], np.round(np.exp(codes * np.float64(scale) - 5.0) * 2 ** FIXED_POINT))
    rng = np.random.default_rng(0)
    sharp = rng.normal(size=(512, 32)) * 8  # wide logits need a deep clip
    flat = rng.normal(size=(512, 32)) * 0.5  # narrow logits prefer a fine step
    candidates = [2.0, 4.0, 8.0, 16.0, 32.0]
    assert choose_beta(sharp, candidates, True) > choose_beta(flat, candidates, True)


def test_float_softmax_beta_pays_for_the_clip_floor_on_long_rows():
    """With exp: float every clipped key keeps e^-β: on a 4000-key row a β chosen as if the floor were
    zero lets them outweigh the peak, and the floor-aware choice is deeper and closer to exact."""
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(64, 4000)) * 3
    rows[:, :4] += 25  # a few keys the query attends to
    candidates = [4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0]
    as_if_zero = choose_beta(rows, candidates, True, floor_is_zero=True)
    aware = choose_beta(rows, candidates, True, floor_is_zero=False)
    assert aware > as_if_zero

    def float_softmax_tv(beta):
        q = np.clip(rows - rows.max(axis=-1, keepdims=True), -beta, 0)
        q = np.round((q + beta / 2) / (beta / 254)) * (beta / 254)  # centred INT8 grid
        p = np.exp(q - q.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        exact = np.exp(rows - rows.max(axis=-1, keepdims=True))
        return 0.5 * np.abs(p - exact / exact.sum(axis=-1, keepdims=True)).sum(axis=-1).mean()

    assert float_softmax_tv(aware) < 0.5 * float_softmax_tv(as_if_zero)


def test_bad_options():
    from onnxq.errors import OnnxqError
    from onnxq.pipeline import make_pass

    with pytest.raises(OnnxqError):
        make_pass("qans", {"exp": "poly"})
    with pytest.raises(OnnxqError):
        make_pass("qans", {"beta": -1.0})


def test_attention_only_uses_structure():
    """With attention_only, only Softmaxes between the QKᵀ and PV MatMuls (onnxq.analysis.structure) are rewritten."""
    from onnxq.ir.modelio import load_model
    from onnxq.passes.nonlinear.softmax import softmax_nodes

    model = load_model(onnx.shape_inference.infer_shapes(attention_model(seq=SEQ)))  # the pass sees typed values
    assert [n.name for n in softmax_nodes(model, True, [])] == ["softmax"]
    assert softmax_nodes(model, True, ["softmax"]) == []
