"""FP8 (E4M3) quantization: the format's arithmetic against ONNX Runtime's, models that run in ONNX
Runtime exactly as ONNX's reference evaluator computes them, TensorRT's FP8 lint rules, and the
int32 bias overflow ONNX Runtime's optimizer falls into."""

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from builders import attention_model, mobilenet_block_model, random_images
from conftest import assert_lint_clean, cli, sqnr_db
from onnxq.errors import OnnxqError, OnnxqValueError
from onnxq.ir.graph import const_array
from onnxq.ir.modelio import load_model
from onnxq.quant.bias_range import detach_overflowing_biases
from onnxq.quant.lint import lint
from onnxq.quant.qdq import FP8
from onnxq.runtime.session import holds_fp8, session


def run(model, feed):
    """ONNX Runtime as onnxq runs a model: FP8 ones at the basic optimization level (docs/fp8.md)."""
    return session(model).run(None, feed)

CALIB = {"input": random_images(32, seed=1)}
EVAL = {"input": random_images(8, seed=2)}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def fp8_cnn():
    return onnxq.quantize(mobilenet_block_model(), CALIB, format="fp8", show_progress=False, log=quiet)


def _fp8_qdq_model(scale: float) -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_fp8_grid_is_onnx_runtimes_quantize_linear_and_within_its_bound():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4000), rng.normal(size=1000) * 1e-3, [500.0, -900.0, 0.0]]).astype(np.float32)
    scale = 0.01
    ort_values = run(_fp8_qdq_model(scale), {"x": x})[0]
    ours = (FP8.to_grid(x / np.float32(scale)) * np.float32(scale)).astype(np.float32)
    np.testing.assert_array_equal(ours, ort_values)
    inside = np.abs(x) <= 448 * scale
    bound = np.maximum(np.abs(x[inside]) / 16, scale * 2.0 ** -10)  # the bound FloatFormat states
    assert np.all(np.abs(ort_values[inside] - x[inside]) <= bound * (1 + 1e-6))
    assert np.all(np.abs(ort_values[~inside]) == np.float32(448 * scale))  # saturates, no NaN


def test_fp8_cnn_runs_in_onnx_runtime_as_the_reference_computes_and_lints_clean(fp8_cnn):
    model = mobilenet_block_model()
    reference = ReferenceEvaluator(fp8_cnn).run(None, EVAL)[0]
    np.testing.assert_allclose(run(fp8_cnn, EVAL)[0], reference, rtol=1e-4, atol=1e-4)
    fp32 = run(model, EVAL)[0]
    assert sqnr_db(fp32, reference) > 25  # 3 mantissa bits: ~30 dB; INT8 reaches ~40 on this block
    assert_lint_clean(fp8_cnn)
    results = {r.rule: r.status for r in lint(load_model(fp8_cnn))}
    assert results["F1"] == results["F2"] == results["F3"] == results["F4"] == "pass"


def test_fp8_structure_types_scales_and_record(fp8_cnn):
    graph = ir.from_proto(fp8_cnn).graph
    assert {o.domain: o.version for o in fp8_cnn.opset_import}[""] >= 21
    qdq = [n for n in graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(len(n.inputs) == 2 for n in qdq)  # no zero point (see FloatFormat)
    for n in qdq:
        stored = n.outputs[0] if n.op_type == "QuantizeLinear" else n.inputs[0]
        assert stored.dtype == ir.DataType.FLOAT8E4M3FN, n.name
    weights = {n.name: n for n in graph if n.op_type == "DequantizeLinear" and const_array(n.inputs[0]) is not None}
    original = {t.name: numpy_helper.to_array(t) for t in mobilenet_block_model().graph.initializer}
    fc = weights["fc.weight_DequantizeLinear"]
    codes = const_array(fc.inputs[0]).astype(np.float32)
    # max calibration per channel puts each row's largest weight on ±448 exactly (mse may clip below)
    assert np.all(np.abs(codes).max(axis=1) <= 448) and np.abs(codes).max() == 448
    dequantized = codes * const_array(fc.inputs[1])[:, None]
    assert np.all(np.abs(dequantized - original["fc.weight"]) <= np.abs(original["fc.weight"]) / 16 + 1e-6)
    assert any("float8e4m3fn" in n.metadata_props.get("onnxq.quantized", "") for n in graph if n.op_type == "Conv")


def test_fp8_transformer_layer_with_gptq():
    model = attention_model()
    rng = np.random.default_rng(3)
    feeds = [{"hidden": rng.normal(size=(1, 8, 16)).astype(np.float32), "attention_mask": np.ones((1, 8), np.int64)}
             for _ in range(24)]
    out = {}
    for rounding in ("nearest", "gptq"):
        recipe = [{"include": "default", "override": {"quantize": {"rounding": rounding}}}]
        q = onnxq.quantize(model, feeds[:16], recipe=recipe, format="fp8", show_progress=False, log=quiet)
        assert_lint_clean(q)
        out[rounding] = np.concatenate([run(q, f)[0] for f in feeds[16:]])
    fp32 = np.concatenate([run(model, f)[0] for f in feeds[16:]])
    assert sqnr_db(fp32, out["nearest"]) > 20 and sqnr_db(fp32, out["gptq"]) > 20


def test_fp8_is_refused_where_it_cannot_work():
    model = mobilenet_block_model()
    with pytest.raises(OnnxqValueError, match="fp8 is for target 'tensorrt'"):
        onnxq.quantize(model, CALIB, format="fp8", target="ort-cpu", show_progress=False, log=quiet)
    with pytest.raises(OnnxqValueError, match="learns integer weights"):
        onnxq.quantize(model, CALIB, format="fp8", rounding="adaround", show_progress=False, log=quiet)
    with pytest.raises(OnnxqValueError, match="not one of int8, fp8"):
        onnxq.quantize(model, CALIB, format="fp4", show_progress=False, log=quiet)
    recipe = [{"include": "default", "override": {"quantize": {"format": "fp8", "weight_bits": 4}}}]
    with pytest.raises(OnnxqError, match="format fp8 is 8-bit"):
        onnxq.quantize(model, CALIB, recipe=recipe, show_progress=False, log=quiet)
    recipe = [{"include": "default", "override": {"quantize": {"format": "fp8", "head_bits": 8}}}]
    with pytest.raises(OnnxqError, match="head_bits chooses an integer grid"):
        onnxq.quantize(model, CALIB, recipe=recipe, show_progress=False, log=quiet)
    recipe = [{"include": "default", "override": {"quantize": {"format": "fp8"}}}]  # opset 19 from the recipe
    with pytest.raises(OnnxqError, match="opset >= 21"):
        onnxq.quantize(model, CALIB, recipe=recipe, show_progress=False, log=quiet)


def test_cli_format_fp8_then_lint(tmp_path, capsys):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **CALIB)
    code, _, err = cli(capsys, "quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz",
                       "-o", tmp_path / "fp8.onnx", "--format", "fp8", "-q")
    assert code == 0, err
    code, out, _ = cli(capsys, "lint", tmp_path / "fp8.onnx")
    assert code == 0 and "F1" in out
    code, _, err = cli(capsys, "quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz",
                       "-o", tmp_path / "cpu.onnx", "--format", "fp8", "--target", "ort-cpu")
    assert code != 0 and "fp8" in err and not (tmp_path / "cpu.onnx").exists()


def _edit_first(model: onnx.ModelProto, op: str, edit) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    edit(next(n for n in edited.graph.node if n.op_type == op), edited)
    return edited


def _failing(model: onnx.ModelProto) -> set[str]:
    return {r.rule for r in lint(load_model(model)) if r.status != "pass"}


def test_lint_catches_fp8_models_tensorrt_or_onnx_runtime_would_get_wrong(fp8_cnn):
    def old_opset(_, m):
        m.opset_import[0].version = 19

    def no_saturation(node, _):
        node.attribute.append(helper.make_attribute("saturate", 0))

    def with_zero_point(node, m):
        m.graph.initializer.append(helper.make_tensor("zp8", TensorProto.FLOAT8E4M3FN, [], [0]))
        node.input.append("zp8")

    ort_cpu = {r.rule for r in lint(load_model(fp8_cnn), "ort-cpu") if r.status == "FAIL"}
    assert "O3" in ort_cpu  # ONNX Runtime's CPU kernels are integer: not an ort-cpu model
    assert "F1" in _failing(_edit_first(fp8_cnn, "QuantizeLinear", old_opset))
    assert "F2" in _failing(_edit_first(fp8_cnn, "QuantizeLinear", no_saturation))
    assert "F4" in _failing(_edit_first(fp8_cnn, "QuantizeLinear", with_zero_point))
    # one Conv reading an INT8 activation and an FP8 weight: TensorRT has no such kernel
    int8 = onnxq.quantize(mobilenet_block_model(), CALIB, show_progress=False, log=quiet)
    fp8_weights = {t.name: t for t in fp8_cnn.graph.initializer if t.name.startswith("stem.weight")}
    mixed = onnx.ModelProto()
    mixed.CopyFrom(int8)
    mixed.opset_import[0].version = 21
    del mixed.graph.value_info[:]  # it still says the stem's weight is INT8
    kept = [t for t in mixed.graph.initializer if not t.name.startswith("stem.weight")]
    del mixed.graph.initializer[:]
    mixed.graph.initializer.extend([*kept, *fp8_weights.values()])
    dq = next(n for n in mixed.graph.node if n.name == "stem.weight_DequantizeLinear")
    del dq.input[2:]
    assert "F3" in _failing(mixed)
    assert "F3" not in _failing(int8) and "F3" not in _failing(fp8_cnn)


def _conv_with_tiny_channel(bias: float) -> onnx.ModelProto:
    """x → FP8 Q/DQ → Conv(DQ(FP8 w), b) → Q/DQ: channel 1's weights are tiny, so b / (s_x·s_w) passes
    int32 (ONNX Runtime re-quantizes the bias of a layer whose output is quantized too)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, 1, 1)).astype(np.float32) * 0.3
    w[1] *= 1e-4
    s_x, s_w = np.float32(4 / 448), (np.abs(w).reshape(2, -1).max(1) / 448).astype(np.float32)
    codes = (w / s_w[:, None, None, None]).astype(ml_dtypes.float8_e4m3fn)
    inits = [numpy_helper.from_array(np.array(s_x), "sx"), numpy_helper.from_array(s_w, "sw"),
             numpy_helper.from_array(np.array([0.5, bias], np.float32), "b"),
             helper.make_tensor("wq", TensorProto.FLOAT8E4M3FN, codes.shape, codes.view(np.uint8).tobytes(), raw=True)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx"], ["xq"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["xq", "sx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "sx"], ["cq"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["cq", "sx"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_a_bias_onnx_runtime_would_overflow_moves_to_an_add():
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)}
    model = _conv_with_tiny_channel(bias=2.0)
    expected = ReferenceEvaluator(model).run(None, x)[0]
    assert holds_fp8(model)
    assert np.abs(run(model, x)[0][0, 1] - expected[0, 1]).max() > 1  # ONNX Runtime's wrapped int32 bias
    assert "O2" in _failing(model)
    work = load_model(model)
    assert detach_overflowing_biases(work.graph) == ["conv"]
    fixed = ir.to_proto(work)
    np.testing.assert_allclose(run(fixed, x)[0], expected, rtol=1e-5, atol=1e-6)
    assert "O2" not in _failing(fixed)
    small = load_model(_conv_with_tiny_channel(bias=1e-9))  # fits int32: left as it is
    assert detach_overflowing_biases(small.graph) == []


def test_a_gemm_bias_moves_with_its_beta():
    """Gemm adds beta·C: the Add that takes the bias over adds beta·C, and the Gemm loses beta."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3)).astype(np.float32) * 0.3
    w[1] *= 1e-4
    s_x, s_w = np.float32(4 / 448), (np.abs(w).max(1) / 448).astype(np.float32)
    codes = (w / s_w[:, None]).astype(ml_dtypes.float8_e4m3fn)
    inits = [numpy_helper.from_array(np.array(s_x), "sx"), numpy_helper.from_array(s_w, "sw"),
             numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "b"),
             helper.make_tensor("wq", TensorProto.FLOAT8E4M3FN, codes.shape, codes.view(np.uint8).tobytes(), raw=True)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx"], ["xq"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["xq", "sx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0),
             helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], name="gemm", transB=1, beta=0.5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = {"x": rng.normal(size=(4, 3)).astype(np.float32)}
    expected = ReferenceEvaluator(model).run(None, x)[0]
    work = load_model(model)
    assert detach_overflowing_biases(work.graph) == ["gemm"]
    fixed = ir.to_proto(work)
    assert not any(a.name == "beta" for n in fixed.graph.node if n.op_type == "Gemm" for a in n.attribute)
    np.testing.assert_allclose(ReferenceEvaluator(fixed).run(None, x)[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(fixed, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_int8_grid_calibrators_are_refused_for_fp8():
    with pytest.raises(OnnxqError, match="chooses its clip for the uniform INT8 grid"):
        onnxq.quantize(mobilenet_block_model(), CALIB, format="fp8", calibrator="entropy", show_progress=False,
                       log=quiet)


def test_auto_calibrator_tries_only_fp8_suited_candidates():
    import json

    model = onnxq.quantize(mobilenet_block_model(), CALIB, format="fp8", calibrator="auto", show_progress=False,
                           log=quiet)
    record = next(r for r in json.loads(next(p.value for p in model.metadata_props if p.key == "onnxq.passes"))
                  if r["name"] == "quantize")
    assert record["summary"]["calibrator_chosen"] in ("max", "percentile")
    assert set(record["summary"]["calibrator_output_error"]) == {"max", "percentile"}
