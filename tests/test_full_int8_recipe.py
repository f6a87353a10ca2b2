"""The built-in full-int8 recipe: it extends transformer-w8a8 by `include` (no copied pass list), and on
tiny transformers built here it leaves no floating-point nonlinear op, runs in ONNX Runtime close to
FP32, and lints clean for TensorRT."""

import numpy as np
import pytest

from conftest import assert_lint_clean
from onnxq.api import quantize
from onnxq.errors import OnnxqError
from onnxq.pipeline import load_recipe
from onnxq.runtime.session import session
from transformer_builders import export, feeds_for, tiny_bert, tiny_llama

NONLINEAR = {"Gelu", "Erf", "Tanh", "Sigmoid", "Softmax", "Softplus", "Exp", "LayerNormalization",
             "SimplifiedLayerNormalization", "Sqrt", "Pow", "Reciprocal", "HardSwish"}


def test_include_cycles_are_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"passes: [{{include: {tmp_path / 'b.yaml'}}}]\n")
    (tmp_path / "b.yaml").write_text(f"passes: [lift_constants, {{include: {tmp_path / 'a.yaml'}}}]\n")
    with pytest.raises(OnnxqError, match="includes itself"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_full_int8_includes_the_transformer_recipe():
    _, w8a8 = load_recipe("transformer-w8a8")
    _, full = load_recipe("full-int8")
    assert [p.name for p in full] == [p.name for p in w8a8] + ["qans", "dulut", "integer_ops"]
    assert [p.name for p in load_recipe([{"include": "default"}, "dulut"])[1]][-3:] == ["quantize", "recentre", "dulut"]
    with pytest.raises(OnnxqError):
        load_recipe([{"include": "no-such-recipe"}])


@pytest.mark.parametrize("kind,build", [("bert", tiny_bert), ("llama", tiny_llama)])
def test_full_int8_leaves_no_float_nonlinear_op(tmp_path, kind, build):
    path = export(build(), tmp_path / f"{kind}.onnx", kind)
    proto = quantize(str(path), feeds_for(kind, 16, seed=1), recipe="full-int8", batch_size=4,
                     show_progress=False, log=lambda *_: None)
    assert not NONLINEAR & {n.op_type for n in proto.graph.node}
    assert_lint_clean(proto)
    feed = feeds_for(kind, 4, seed=7)

    def run(model):
        sess = session(model)
        return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]

    ref, got = run(str(path)).ravel(), run(proto).ravel()
    cosine = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cosine > 0.95, cosine
