"""cfws (coarse & fine weight split) on a RepVGG-style block whose 3×3 kernel has its 1×1 and identity
branches merged into the centre taps: exact in FP32, splits only merged kernels, and quantized per tensor
the split layer is far nearer FP32 than without it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from conftest import assert_lint_clean, rel_change, run, sqnr_db
from onnxq.passes.cnn.weight_split import centre_ratio, split_weight
from onnxq.pipeline import PassContext, load_recipe, run_pipeline
from onnxq.quant.scheme import QuantScheme

C = 8


def repvgg_model(seed: int = 0) -> onnx.ModelProto:
    """x → Conv3×3 (merged 3×3 + 1×1 + identity branches) → ReLU → Conv3×3 (plain) → GAP → out."""
    rng = np.random.default_rng(seed)
    merged = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.05  # the 3×3 branch
    merged[:, :, 1, 1] += rng.standard_normal((C, C)).astype(np.float32) * 0.4  # the 1×1 branch
    merged[np.arange(C), np.arange(C), 1, 1] += 1.0  # the identity branch
    plain = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(merged, "rep_w"), numpy_helper.from_array(rng.standard_normal(C).astype(np.float32) * 0.1, "rep_b"),
             numpy_helper.from_array(plain, "plain_w")]
    nodes = [helper.make_node("Conv", ["x", "rep_w", "rep_b"], ["rep"], name="rep", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["rep"], ["act"], name="relu"),
             helper.make_node("Conv", ["act", "plain_w"], ["conv2"], name="plain", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv2"], ["out"], name="gap")]
    graph = helper.make_graph(nodes, "repvgg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 12, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", C, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C, 12, 12)).astype(np.float32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_parts_sum_to_the_weight_and_the_coarse_part_is_on_the_grid(per_channel):
    w = onnx.numpy_helper.to_array(repvgg_model().graph.initializer[0])
    coarse, fine = split_weight(w, 127, per_channel)
    np.testing.assert_allclose(coarse + fine, w, rtol=0, atol=1e-7)
    axes = (1, 2, 3) if per_channel else None
    step = np.abs(w).max(axis=axes, keepdims=per_channel) / 127
    np.testing.assert_allclose(coarse / step, np.round(coarse / step), atol=1e-3)  # integers of the step
    assert np.all(np.abs(fine) <= step / 2 + 1e-7)
    assert centre_ratio(w) > 5


def test_cfws_is_exact_and_splits_only_the_merged_kernel():
    model = repvgg_model()
    work = ir.from_proto(model)
    records = run_pipeline(work, load_recipe(["cfws"])[1], PassContext(scheme=QuantScheme(weights="per-tensor"),
                                                                       show_progress=False))
    summary = records[0].summary
    assert summary["split"] == ["rep"] and "not a merged kernel" in summary["left_alone"]["plain"]
    convs = [n for n in work.graph if n.op_type == "Conv"]
    assert len(convs) == 3 and any(n.op_type == "Add" for n in work.graph)
    x = images(4, seed=3)
    before, after = run(model, {"x": x})[0], run(ir.to_proto(work), {"x": x})[0]
    assert rel_change(before, after) < 1e-6


def _dequantized(model: onnx.ModelProto, name_part: str) -> np.ndarray:
    """Sum of the dequantized weights whose quantized initializer's name contains `name_part`."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and name_part in n.input[0]]
    return dqs, sum(inits[n.input[0]].astype(np.float64) * inits[n.input[1]] for n in dqs)


def test_per_tensor_w8a8_with_cfws_keeps_the_merged_weight_and_lints_clean():
    model, calib, evaluation = repvgg_model(), {"x": images(32, seed=1)}, {"x": images(16, seed=2)}
    weight = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    steps = [{"quantize": {"weights": "per-tensor", "calibrator": "max", "weight_calibrator": "max"}}]
    plain = onnxq.quantize(model, calib, recipe=steps, batch_size=8, show_progress=False, log=lambda *_: None)
    split = onnxq.quantize(model, calib, recipe=["cfws", *steps], batch_size=8, show_progress=False, log=lambda *_: None)
    dqs_plain, w_plain = _dequantized(plain, "rep_w")
    dqs_split, w_split = _dequantized(split, "rep_w")
    assert len(dqs_plain) == 1 and len(dqs_split) == 2  # each half has its own weight DQ
    error_plain, error_split = np.abs(w_plain - weight).max(), np.abs(w_split - weight).max()
    assert error_split < error_plain / 100, (error_plain, error_split)  # about 1/(2·127) of one step
    reference = run(model, evaluation)[0]
    assert sqnr_db(reference, run(split, evaluation)[0]) > sqnr_db(reference, run(plain, evaluation)[0])
    assert_lint_clean(split)
