"""integer_ops: DI-ClippedSoftmax and DI-Norm emitted as float-carried integer subgraphs, bit-exact
in ONNX Runtime to the NumPy integer reference (onnxq.passes.nonlinear.integer_ref), lint clean, with bounded error."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, run
from onnxq.api import quantize
from onnxq.passes.nonlinear.integer_ref import (
    NormParams,
    SoftmaxParams,
    di_exp,
    di_exp_step,
    di_norm,
    di_softmax,
    dyadic,
    isqrt_round,
)

F32 = np.float32
OPTS = {"batch_size": 8, "show_progress": False, "log": lambda *_: None}


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def softmax_model(length=24) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1)], "sm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, length])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3, length])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def layernorm_model(hidden=48, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [_c("gamma", rng.uniform(0.5, 1.5, hidden)), _c("beta", rng.normal(size=hidden) * 0.1)]
    node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1, epsilon=1e-12)
    graph = helper.make_graph([node], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def rmsnorm_model(hidden=40, seed=0) -> onnx.ModelProto:
    """LLaMA's RMSNorm as exported: x·(1/√(mean(x²) + ε))·γ."""
    rng = np.random.default_rng(seed)
    inits = [_c("gamma", rng.uniform(0.5, 1.5, hidden)), _c("two", 2.0), _c("eps", 1e-5), _c("one", 1.0),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="norm/Pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="norm/ReduceMean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="norm/Add"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="norm/Sqrt"),
             helper.make_node("Div", ["one", "rms"], ["inv"], name="norm/Div"),
             helper.make_node("Mul", ["x", "inv"], ["xn"], name="norm/Mul"),
             helper.make_node("Mul", ["gamma", "xn"], ["y"], name="norm/Mul_1")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, hidden])], inits[:-1])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def logits(n=16, length=24, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3, length)) * rng.uniform(0.5, 6, size=(n, 3, 1))).astype(F32)
    x[::3, :, length // 2:] += F32(np.finfo(np.float32).min)  # padded positions, as BERT masks them
    x[1, 0] = 7.0                                            # a constant row
    return x


# --- the integer reference ----------------------------------------------------------------------


def test_isqrt_round_is_exact():
    n = np.arange(1 << 16)
    expected = np.array([math.isqrt(int(v)) for v in n])
    expected += (n - expected ** 2 > expected)
    np.testing.assert_array_equal(isqrt_round(n), expected)
    big = np.random.default_rng(0).integers(0, 1 << 24, 20000)
    np.testing.assert_array_equal(isqrt_round(big), np.round(np.sqrt(big.astype(np.float64))).astype(np.int64))


def test_di_exp_reference():
    m, k = dyadic(15 / 255)
    assert (m, k) == (241, 12) and di_exp_step(m, k) == 12
    x = np.arange(-255, 1)
    e = di_exp(x, m, k, 8) / (12 * 2.0 ** 8)
    true = np.exp(x * m / 2 ** k)
    assert e[-1] == 1.0 and np.all(np.diff(e) >= 0)
    assert np.abs(e - true).max() < 0.06  # the linear 2^f and m_f ≈ m·log2(e): I-LLM's approximation
    with pytest.raises(ValueError):
        di_exp(np.array([1]), m, k, 8)


def test_norm_params_keep_float32_exact():
    for hidden, rms in ((48, False), (384, False), (576, True), (4096, True)):
        p = NormParams(hidden, rms)
        p.check()
        assert hidden * ((p.max_d ** 2 + (1 << p.square_shift >> 1)) >> p.square_shift) < 1 << 24
        assert p.max_d * (1 << (p.frac_bits + 1)) + (1 << 12) <= 1 << 24


# --- the ONNX subgraphs, bit for bit ------------------------------------------------------------------


def test_di_softmax_bit_exact():
    model = softmax_model()
    calib = {"x": logits(32, seed=1)}
    out = quantize(model, calib, recipe=[{"integer_ops": {"max_row": 64}}], **OPTS)
    assert "Softmax" not in {n.op_type for n in out.graph.node}
    assert not {"BitShift", "Mod", "Exp", "Pow"} & {n.op_type for n in out.graph.node}
    x = logits(64, seed=2)
    got = run(out, {"x": x})[0]
    np.testing.assert_array_equal(got, di_softmax(x, SoftmaxParams(max_row=64)))
    p_int = got.astype(np.float64) * 127
    assert np.abs(p_int - np.round(p_int)).max() < 1e-4  # integers in [0, 127], times 1/127
    assert p_int.min() >= 0 and np.round(p_int).max() <= 127
    ref = run(model, {"x": x})[0]
    assert np.abs(got - ref)[1::3].max() < 0.06 and np.all(got[::3, :, 12:] == 0)  # masked positions get 0


def test_di_layernorm_bit_exact():
    model = layernorm_model()
    rng = np.random.default_rng(0)
    calib = {"x": (rng.normal(size=(16, 5, 48)) * 3).astype(F32)}
    out = quantize(model, calib, recipe=["integer_ops"], **OPTS)
    assert "LayerNormalization" not in {n.op_type for n in out.graph.node}
    x = (rng.normal(size=(32, 5, 48)) * rng.uniform(0.01, 50, size=(32, 5, 1))).astype(F32)
    x[0, 0] = 3.0   # constant row: d = 0, output β
    x[0, 1] = 0.0   # zero row
    x[1, :, 7] *= 40  # an outlier channel
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = run(out, {"x": x})[0]
    np.testing.assert_array_equal(got, di_norm(x, NormParams(48), init["gamma"], init["beta"]))
    np.testing.assert_allclose(got[0, :2], np.broadcast_to(init["beta"], (2, 48)), atol=1e-6)
    ref = run(model, {"x": x})[0]
    step = (ref.max() - ref.min()) / 255
    assert np.abs(got - ref).max() / step < 0.5


def test_a_norm_reading_another_norm_is_replaced_in_one_run():
    """A final norm straight after the last layer's norm (PETR's post_norm): both become DI-Norm in one
    run, the second reading the first's replacement, bit-exact to the chained integer reference."""
    rng = np.random.default_rng(2)
    g1, b1, g2, b2 = rng.uniform(0.5, 1.5, 48), rng.normal(size=48) * 0.1, rng.uniform(0.5, 1.5, 48), rng.normal(size=48)
    nodes = [helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], name="norm3", axis=-1, epsilon=1e-12),
             helper.make_node("LayerNormalization", ["n1", "g2", "b2"], ["y"], name="post_norm", axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "two_norms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 48])],
                              [_c("g1", g1), _c("b1", b1), _c("g2", g2), _c("b2", b2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    calib = {"x": (rng.normal(size=(16, 5, 48)) * 3).astype(F32)}
    out = quantize(model, calib, recipe=[{"integer_ops": {"ops": ["norm"]}}], **OPTS)
    assert "LayerNormalization" not in {n.op_type for n in out.graph.node}
    x = (rng.normal(size=(8, 5, 48)) * 2).astype(F32)
    p = NormParams(48)
    want = di_norm(di_norm(x, p, F32(g1), F32(b1)), p, F32(g2), F32(b2))
    np.testing.assert_array_equal(run(out, {"x": x})[0], want)


def test_di_rmsnorm_decomposed_bit_exact():
    model = rmsnorm_model()
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(size=(16, 5, 40)).astype(F32)}
    out = quantize(model, calib, recipe=["integer_ops"], **OPTS)
    ops = {n.op_type for n in out.graph.node}
    assert not ops & {"Pow", "Sqrt", "ReduceMean"}, ops
    x = (rng.normal(size=(32, 5, 40)) * rng.uniform(0.01, 100, size=(32, 5, 1))).astype(F32)
    gamma = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["gamma"]
    got = run(out, {"x": x})[0]
    np.testing.assert_array_equal(got, di_norm(x, NormParams(40, rms=True), gamma))
    ref = run(model, {"x": x})[0]
    assert np.abs(got - ref).max() / ((ref.max() - ref.min()) / 255) < 0.5


def test_fidelity_recorded_and_lint_clean():
    import json

    from onnxq.analysis.inspection import inspect_model
    from onnxq.ir.modelio import load_model

    rng = np.random.default_rng(0)
    hidden = 16
    inits = [_c("w", rng.normal(size=(hidden, hidden)) / 4), _c("gamma", np.ones(hidden)), _c("beta", np.zeros(hidden)),
             _c("w2", rng.normal(size=(hidden, hidden)) / 4)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc/MatMul"),
             helper.make_node("Add", ["x", "h"], ["r"], name="residual/Add"),
             helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["s"], name="scores/MatMul"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="out/MatMul")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    out = quantize(model, {"x": rng.normal(size=(16, 4, hidden)).astype(F32)}, recipe=["quantize", "integer_ops"], **OPTS)
    assert_lint_clean(out)
    info = inspect_model(load_model(out))
    assert info.nonlinear_coverage == 1.0 and info.nonlinear_replaced == 2
    fid = {e["function"]: e for e in json.loads(load_model(out).metadata_props["onnxq.fidelity"])}
    # DI-Norm is fine-grained; DI-ClippedSoftmax pays for its 8-bit input and 127-level output
    assert fid["layernorm"]["max_steps"] < 0.5 and fid["softmax"]["mean_steps"] < 2.0
    assert info.quantized_op_counts.get("(replacement)") == 2
