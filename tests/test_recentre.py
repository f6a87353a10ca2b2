"""recentre: ReLU outputs read by linear layers are quantized as x - T/2 at half the step. Checked on
graphs built here: the new grid never rounds a value worse, the readers' biases absorb the shift
exactly, padded convs and asymmetric (ONNX Runtime CPU) quantizers are left alone, lint stays clean."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, run
from onnxq.api import quantize

OPTS = {"batch_size": 8, "show_progress": False, "log": lambda *_: None}
QUANTIZE = {"quantize": {"calibrator": "max", "weights": "per-tensor", "bias_correction": False}}


def _model(nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def mlp():
    """x → Linear(+bias) → ReLU → Linear (no bias) → ReLU → Linear(+bias) → y."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(8, 32)), "b1": rng.normal(size=32) * 0.5, "w2": rng.normal(size=(32, 16)) / 4,
             "w3": rng.normal(size=(16, 4)) / 3, "b3": rng.normal(size=4)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"), helper.make_node("Add", ["h3", "b3"], ["y"], name="fc3_bias")]
    return _model(nodes, inits, [8], [4])


def convnet():
    """3x3 conv → ReLU → 1x1 conv (recentred) → ReLU → 3x3 padded conv (left alone)."""
    rng = np.random.default_rng(1)
    inits = {"k1": rng.normal(size=(8, 3, 3, 3)) / 3, "c1": rng.normal(size=8) * 0.3, "k2": rng.normal(size=(8, 8, 1, 1)) / 3,
             "c2": rng.normal(size=8) * 0.3, "k3": rng.normal(size=(4, 8, 3, 3)) / 6, "c3": rng.normal(size=4)}
    nodes = [helper.make_node("Conv", ["x", "k1", "c1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2", "c2"], ["h2"], name="conv2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "k3", "c3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    return _model(nodes, inits, [3, 8, 8], [4, 8, 8])


def feeds(shape, n=32, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)}


def _record(proto, name):
    import json

    return next(r for r in json.loads({p.key: p.value for p in proto.metadata_props}["onnxq.passes"])
                if r["name"] == name)


def _bypass(proto: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy where the readers of `tensor`'s Q/DQ read the float tensor itself."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    dqs = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in dqs:
                node.input[i] = tensor
    return out


def _unoptimized(proto, feed):
    from onnxq.runtime.session import session

    return session(proto, optimize=False).run(None, feed)


def _expose(proto: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return out


def test_finer_grid_never_rounds_worse_and_output_nearer_fp32():
    model, calib, x = mlp(), feeds([8]), feeds([8], n=64, seed=5)
    plain = quantize(model, calib, recipe=[QUANTIZE], **OPTS)
    centred = quantize(model, calib, recipe=[QUANTIZE, "recentre"], **OPTS)
    assert _record(centred, "recentre")["summary"]["recentred"] == 2
    scale = {n.input[0]: n.input[1] for n in plain.graph.node if n.op_type == "QuantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in centred.graph.initializer}
    plain_inits = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    q = next(n for n in centred.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("r1"))
    s_old = float(plain_inits[scale["r1"]])
    assert float(inits[q.input[1]]) == pytest.approx(s_old / 2)
    # the dequantized ReLU output, old grid against new grid (+ the centre), elementwise
    dq_old = next(n.output[0] for n in plain.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("r1"))
    dq_new = next(n.output[0] for n in centred.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    r1, old = _unoptimized(_expose(plain, ["r1", dq_old]), x)[1:]  # no fusions: both see the same r1
    r1_centred, new = _unoptimized(_expose(centred, ["r1", dq_new]), x)[1:]
    np.testing.assert_array_equal(r1, r1_centred)
    err_old, err_new = np.abs(old - r1), np.abs(new + np.float32(127 * s_old / 2) - r1)
    assert np.all(err_new <= err_old + 1e-5)
    assert err_new.mean() < 0.6 * err_old.mean()
    ref = run(model, x)[0]
    assert np.abs(run(centred, x)[0] - ref).mean() < np.abs(run(plain, x)[0] - ref).mean()
    assert_lint_clean(centred)


def test_bias_absorbs_the_shift_exactly():
    """With the recentred tensor's Q/DQ bypassed, the model computes Ŵ(x - c) + b + cŴ1 = Ŵx + b: the
    same as the plain quantized model with that Q/DQ bypassed (covers an existing bias Add, a new one)."""
    model, calib, x = mlp(), feeds([8]), feeds([8], n=16, seed=7)
    plain = quantize(model, calib, recipe=[QUANTIZE], **OPTS)
    centred = quantize(model, calib, recipe=[QUANTIZE, "recentre"], **OPTS)
    for tensor in ("r1", "r2"):
        sub = next(n.output[0] for n in centred.graph.node if n.op_type == "Sub" and n.input[0] == tensor)
        plain, centred = _bypass(plain, tensor), _bypass(centred, sub)
    a, b = _unoptimized(plain, x)[0], _unoptimized(centred, x)[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_convs_padded_reader_left_alone():
    model, calib, x = convnet(), feeds([3, 8, 8]), feeds([3, 8, 8], n=16, seed=3)
    plain = quantize(model, calib, recipe=[QUANTIZE], **OPTS)
    centred = quantize(model, calib, recipe=[QUANTIZE, "recentre"], **OPTS)
    summary = _record(centred, "recentre")["summary"]
    assert summary["recentred"] == 1
    assert "padded Conv" in summary["left_alone"]["r2"]
    ref = run(model, x)[0]
    assert np.abs(run(centred, x)[0] - ref).mean() < np.abs(run(plain, x)[0] - ref).mean()
    assert_lint_clean(centred)


def test_asymmetric_quantizers_untouched():
    """ONNX Runtime's CPU table quantizes activations as UINT8 with a zero point: nothing to recentre."""
    model, calib = mlp(), feeds([8])
    out = quantize(model, calib, recipe=[QUANTIZE, "recentre"], target="ort-cpu", **OPTS)
    assert _record(out, "recentre")["summary"]["recentred"] == 0
    assert not any(n.op_type == "Sub" for n in out.graph.node)


def test_bias_corrected_readers_keep_their_correction():
    """quantize's bias correction compensated the old grid's mean rounding error in the 1x1 conv; recentre
    moves the change of that mean into the bias: over the calibration data the conv's per-channel output
    mean is the corrected one it had before (the rounding change alone moves it)."""
    model, calib = convnet(), feeds([3, 8, 8], n=64)
    step = {"quantize": {**QUANTIZE["quantize"], "bias_correction": True}}
    plain = quantize(model, calib, recipe=[step], **OPTS)
    centred = quantize(model, calib, recipe=[step, "recentre"], **OPTS)
    conv2 = next(n for n in centred.graph.node if n.name == "conv2")
    assert any(p.key == "onnxq.bias_corrected" for p in conv2.metadata_props)
    before = _unoptimized(_expose(plain, ["h2"]), calib)[1].mean(axis=(0, 2, 3))
    after = _unoptimized(_expose(centred, ["h2"]), calib)[1].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(after, before, atol=2e-4 * np.abs(before).max())
    x = feeds([3, 8, 8], n=64, seed=11)
    ref = run(model, x)[0]
    assert np.mean((run(centred, x)[0] - ref) ** 2) < np.mean((run(plain, x)[0] - ref) ** 2)
