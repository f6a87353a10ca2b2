"""Padded positions (attention_mask == 0) are left out of calibration: their activations reach no
output a user reads, so they must not set ranges, GPTQ Hessians or the calibrator choice."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from onnxq.api import quantize
from onnxq.errors import OnnxqError
from onnxq.stats.calib_data import load_calibration
from onnxq.stats.service import real_rows

SEQ, HIDDEN = 6, 8


def masked_linear_model() -> onnx.ModelProto:
    """y = x·W; the mask is passed through as a second output (as an encoder's pooling would use it)."""
    w = np.random.default_rng(0).normal(size=(HIDDEN, HIDDEN)).astype(np.float32) / 3
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear"),
         helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="mask_cast")],
        "masked_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", SEQ, HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", SEQ, HIDDEN]),
         helper.make_tensor_value_info("mask_f", TensorProto.FLOAT, ["B", SEQ])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def padded_batch(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Real positions hold N(0, 1); padded ones (the last half of each row) hold junk of size 500."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SEQ, HIDDEN)).astype(np.float32)
    mask = np.ones((n, SEQ), np.int64)
    mask[:, SEQ // 2:] = 0
    x[mask == 0] = 500.0 * rng.choice([-1.0, 1.0], size=(int((mask == 0).sum()), HIDDEN))
    return {"x": x, "attention_mask": mask}


def input_scale(model: onnx.ModelProto) -> float:
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale = next(t for t in model.graph.initializer if t.name == q.input[1])
    return float(numpy_helper.to_array(scale))


def quantized(calib, **kwargs) -> onnx.ModelProto:
    return quantize(masked_linear_model(), calib, recipe=[{"quantize": {"calibrator": "max"}}], batch_size=8,
                    show_progress=False, log=lambda *_: None, **kwargs)


def real_position_error(model: onnx.ModelProto, feed) -> float:
    keep = feed["attention_mask"].astype(bool)
    ref, out = run(masked_linear_model(), feed)[0][keep], run(model, feed)[0][keep]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_real_rows_keeps_the_masked_positions_of_sequence_tensors_only():
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(real_rows(x, mask), x.reshape(6, 4)[[0, 1, 3]])
    heads = np.zeros((2, 5, 3, 3))  # (batch, heads, seq, seq): not laid out (batch, sequence, ...)
    assert real_rows(heads, mask) is heads


def test_auto_finds_attention_mask_and_ranges_follow_the_real_positions():
    calib = padded_batch()
    real_max = float(np.abs(calib["x"][calib["attention_mask"] == 1]).max())
    masked = quantized(calib)
    assert input_scale(masked) == pytest.approx(real_max / 127, rel=1e-5)
    unmasked = quantized(calib, padding_mask=None)
    assert input_scale(unmasked) == pytest.approx(500.0 / 127, rel=1e-5)
    # on real positions the masked range is ~60x finer, and the output error shows it
    probe = padded_batch(16, seed=1)
    assert real_position_error(masked, probe) < 0.02 < real_position_error(unmasked, probe)


def test_explicit_padding_mask_is_checked_against_the_model_inputs():
    import onnx_ir as ir

    model = ir.from_proto(masked_linear_model())
    assert load_calibration(padded_batch(), model, padding_mask="attention_mask").padding_mask == "attention_mask"
    with pytest.raises(OnnxqError, match="padding mask 'x' is not a rank-2 integer or bool model input"):
        load_calibration(padded_batch(), model, padding_mask="x")
    with pytest.raises(OnnxqError, match="padding mask 'mask' is not a rank-2 integer or bool model input"):
        load_calibration(padded_batch(), model, padding_mask="mask")
    # a rank-2 float input is refused too: float masks are often additive (0 = keep), the opposite meaning
    float_mask = masked_linear_model()
    float_mask.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT
    float_mask.graph.node[1].attribute[0].i = TensorProto.FLOAT
    calib = {**padded_batch(), "attention_mask": padded_batch()["attention_mask"].astype(np.float32)}
    with pytest.raises(OnnxqError, match="not a rank-2 integer or bool model input"):
        load_calibration(calib, ir.from_proto(float_mask), padding_mask="attention_mask")
    assert load_calibration(calib, ir.from_proto(float_mask)).padding_mask is None  # and auto skips it
