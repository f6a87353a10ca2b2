"""--high-precision fp16 (the half_float pass): what stays float runs in FP16, I/O included; the model
runs in ONNX Runtime, stays close to FP32, lints clean, and onnxq compare reads it."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from builders import attention_model, mobilenet_block_model, random_images
from conftest import assert_lint_clean, cli, run, sqnr_db
from onnxq.errors import OnnxqError, OnnxqValueError

CALIB = {"input": random_images(32, seed=1)}
EVAL = {"input": random_images(8, seed=2)}


def quiet(*_):
    pass


def float_types(model: onnx.ModelProto) -> set[int]:
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    types = {t.data_type for t in model.graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    return types & floats


def test_cnn_in_fp16_runs_close_to_fp32_and_lints_clean():
    model = mobilenet_block_model()
    half = onnxq.quantize(model, CALIB, high_precision="fp16", show_progress=False, log=quiet)
    full = onnxq.quantize(model, CALIB, show_progress=False, log=quiet)
    assert float_types(half) == {TensorProto.FLOAT16} and float_types(full) == {TensorProto.FLOAT}
    out = run(half, {"input": EVAL["input"].astype(np.float16)})[0]
    assert out.dtype == np.float16
    fp32 = run(model, EVAL)[0]
    # FP16 adds ~2^-11 per float op: far below INT8's error, so the two quantized models stay close
    assert sqnr_db(fp32, out.astype(np.float32)) > sqnr_db(fp32, run(full, EVAL)[0]) - 1.5
    assert_lint_clean(half)
    steps = json.loads(half.metadata_props[[p.key for p in half.metadata_props].index("onnxq.passes")].value)
    assert steps[-1]["name"] == "half_float"


def test_attention_mask_is_clipped_to_fp16_range_not_infinite():
    model = attention_model()
    rng = np.random.default_rng(0)
    mask = np.ones((1, 8), np.int64)
    mask[0, 6:] = 0
    feeds = [{"hidden": rng.normal(size=(1, 8, 16)).astype(np.float32), "attention_mask": mask} for _ in range(12)]
    half = onnxq.quantize(model, feeds[:8], high_precision="fp16", show_progress=False, log=quiet)
    assert min(numpy_helper.to_array(t).min() for t in half.graph.initializer
               if t.data_type == TensorProto.FLOAT16) == np.float16(-65504)
    for feed in feeds[8:]:
        out = run(half, {**feed, "hidden": feed["hidden"].astype(np.float16)})[0]
        assert np.isfinite(out).all()
        assert sqnr_db(run(model, feed)[0], out.astype(np.float32)) > 15


def _resize_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["up"], name="resize", mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["out"], name="conv2")]
    inits.append(numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32) * 0.3, "w2"))
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_inputs_onnx_types_as_float32_stay_float32():
    half = onnxq.quantize(_resize_model(), CALIB, high_precision="fp16", show_progress=False, log=quiet)
    scales = next(t for t in half.graph.initializer if t.name == "scales")
    assert scales.data_type == TensorProto.FLOAT
    out = run(half, {"input": EVAL["input"].astype(np.float16)})[0]
    assert out.shape == (8, 2, 32, 32) and out.dtype == np.float16


def test_fp16_refusals_and_order():
    model = mobilenet_block_model()
    with pytest.raises(OnnxqValueError, match="fp16 is for target 'tensorrt'"):
        onnxq.quantize(model, CALIB, high_precision="fp16", target="ort-cpu", show_progress=False, log=quiet)
    with pytest.raises(OnnxqValueError, match="not one of fp32, fp16"):
        onnxq.quantize(model, CALIB, high_precision="bf16", show_progress=False, log=quiet)
    with pytest.raises(OnnxqError, match="put it after 'quantize'"):
        onnxq.quantize(model, CALIB, recipe=["half_float", "quantize"], show_progress=False, log=quiet)


def test_cli_high_precision_then_compare(tmp_path, capsys):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **CALIB)
    np.savez(tmp_path / "eval.npz", **EVAL)
    code, _, err = cli(capsys, "quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz",
                       "-o", tmp_path / "half.onnx", "--high-precision", "fp16", "-q")
    assert code == 0, err
    code, _, err = cli(capsys, "compare", tmp_path / "model.onnx", tmp_path / "half.onnx", "--data",
                         tmp_path / "eval.npz", "--json", tmp_path / "compare.json")
    assert code == 0, err
    assert json.loads((tmp_path / "compare.json").read_text())["outputs"][0]["sqnr_db"] > 30


def _scaled_conv(scale: float) -> onnx.ModelProto:
    """x·scale → Conv → ·(1/scale): the same function for any scale, but FP16 holds x·scale only below 65504."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "up"),
             numpy_helper.from_array(np.array(1 / scale, np.float32), "down"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.3, "w")]
    nodes = [helper.make_node("Mul", ["input", "up"], ["big"], name="up"),
             helper.make_node("Conv", ["big", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "down"], ["out"], name="down")]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("scale, message", [(1e5, "float tensors pass FP16's range"),
                                            (3e4, "float tensors pass FP16's range")])
def test_what_fp16_cannot_hold_is_refused_not_clipped(tmp_path, scale, message):
    with pytest.raises(OnnxqError, match=message):
        onnxq.quantize(_scaled_conv(scale), CALIB, high_precision="fp16", output=tmp_path / "q.onnx",
                       show_progress=False, log=quiet)
    assert not (tmp_path / "q.onnx").exists()
    fine = onnxq.quantize(_scaled_conv(10.0), CALIB, high_precision="fp16", show_progress=False, log=quiet)
    assert np.isfinite(run(fine, {"input": EVAL["input"].astype(np.float16)})[0]).all()


def test_full_int8_integer_arithmetic_is_not_put_in_fp16():
    model = attention_model()
    feeds = [{"hidden": np.random.default_rng(s).normal(size=(1, 8, 16)).astype(np.float32),
              "attention_mask": np.ones((1, 8), np.int64)} for s in range(8)]
    with pytest.raises(OnnxqError, match="exact integer arithmetic in float32"):
        onnxq.quantize(model, feeds, recipe="full-int8", high_precision="fp16", show_progress=False, log=quiet)


def test_a_data_constant_past_fp16_range_is_refused_even_when_the_tensors_fit():
    model = _scaled_conv(1e5)
    tiny = numpy_helper.from_array(np.array(1e-6, np.float32), "tiny")
    model.graph.initializer.append(tiny)
    model.graph.node.insert(0, helper.make_node("Mul", ["input", "tiny"], ["small"], name="tiny"))
    model.graph.node[1].input[0] = "small"  # x·1e-6·1e5: every tensor fits, the constant 1e5 does not
    with pytest.raises(OnnxqError, match="constant 'up' holds values up to 1e\\+05"):
        onnxq.quantize(model, CALIB, high_precision="fp16", show_progress=False, log=quiet)


def test_report_of_an_fp16_model(tmp_path, capsys):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **CALIB)
    np.savez(tmp_path / "eval.npz", **EVAL)
    code, _, err = cli(capsys, "quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz", "-o",
                       tmp_path / "half.onnx", "--high-precision", "fp16", "--report-html", tmp_path / "q.html", "-q")
    assert code == 0, err
    code, _, err = cli(capsys, "report", tmp_path / "model.onnx", tmp_path / "half.onnx", "--data",
                       tmp_path / "eval.npz", "-o", tmp_path / "r.html", "-q")
    assert code == 0, err
    assert "half_float" in (tmp_path / "r.html").read_text() and (tmp_path / "q.html").stat().st_size > 10_000


def test_quantize_counts_a_skipped_huge_constant_tensor_once():
    # x·1e5 looks like a mask to the planner (a huge constant): left float, and counted as skipped only
    q = onnxq.quantize(_scaled_conv(1e5), CALIB, show_progress=False, log=quiet)
    record = next(json.loads(p.value) for p in q.metadata_props if p.key == "onnxq.passes")
    summary = next(r["summary"] for r in record if r["name"] == "quantize")
    assert summary["activations_quantized"] == 0 and summary["skipped"] == 1  # was -1 and 1


def test_subnormal_fp16_scales_are_reported():
    model = _scaled_conv(10.0)
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1e-3, "w"))  # weight scales ~1e-5: FP16 subnormal
    lines = []
    onnxq.quantize(model, CALIB, high_precision="fp16", show_progress=False, log=lines.append)
    assert any("Q/DQ scales are below FP16's normal range" in line for line in lines)


def test_a_constant_node_past_fp16_range_is_refused_too():
    model = _scaled_conv(1e5)
    up = next(i for i in model.graph.initializer if i.name == "up")
    model.graph.initializer.remove(up)
    tiny = numpy_helper.from_array(np.array(1e-6, np.float32), "tiny")
    model.graph.initializer.append(tiny)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["up"], name="make_up", value=up))
    model.graph.node.insert(1, helper.make_node("Mul", ["input", "tiny"], ["small"], name="tiny"))
    model.graph.node[2].input[0] = "small"
    # no lift_constants: the Constant node stays a node, whose attribute half_float converts
    with pytest.raises(OnnxqError, match="the constant made by node 'make_up' holds values up to 1e\\+05"):
        onnxq.quantize(model, CALIB, recipe=["quantize", "half_float"], show_progress=False, log=quiet)
