"""End-to-end quantization on small graphs: accuracy, TensorRT conformance, structure, metadata."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import attention_model, concat_model, mobilenet_block_model, random_images
from conftest import assert_lint_clean, run, sqnr_db
from onnxq import quantize
from onnxq.errors import OnnxqError
from onnxq.ir.graph import const_array

CALIB = {"input": random_images(32, seed=1)}
EVAL = {"input": random_images(8, seed=2)}


def q_dq_of(model: onnx.ModelProto, op: str):
    return [n for n in model.graph.node if n.op_type == op]


def init(model, name):
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("calibrator", ["max", "percentile", "entropy", "mse"])
def test_cnn_int8_is_close_to_fp32_and_lints_clean(per_tensor, calibrator):
    model = mobilenet_block_model()
    qmodel = quantize(model, CALIB, per_tensor=per_tensor, calibrator=calibrator, show_progress=False)
    assert sqnr_db(run(model, EVAL)[0], run(qmodel, EVAL)[0]) > 25
    assert_lint_clean(qmodel)


def test_tensorrt_structure():
    qmodel = quantize(mobilenet_block_model(), CALIB, show_progress=False)
    assert_lint_clean(qmodel)
    graph = ir.from_proto(qmodel).graph
    for node in graph:
        if node.op_type in ("Conv", "Gemm"):  # both inputs through DQ; bias stays float
            assert all(v.producer().op_type == "DequantizeLinear" for v in node.inputs[:2]), node.name
            if len(node.inputs) > 2:
                assert const_array(node.inputs[2]).dtype == np.float32
        if node.op_type == "DequantizeLinear" and const_array(node.inputs[0]) is not None:
            w = const_array(node.inputs[0])
            assert w.dtype == np.int8 and w.min() >= -127
            assert node.attributes["axis"].value == 0  # Conv: axis 0; Gemm with transB=1: axis 0 too
            assert const_array(node.inputs[1]).shape == (w.shape[0],)
    zero_points = [const_array(n.inputs[2]) for n in graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(np.all(z == 0) for z in zero_points)
    # the residual Add: the block input arrives quantized, the projection conv output does not
    add = next(n for n in graph if n.op_type == "Add")
    producers = sorted(v.producer().op_type for v in add.inputs)
    assert producers == ["Conv", "DequantizeLinear"]
    # no Q/DQ on data movement: Flatten reads the float pooled tensor
    flatten = next(n for n in graph if n.op_type == "Flatten")
    assert flatten.inputs[0].producer().op_type == "GlobalAveragePool"


def test_per_tensor_weights_have_scalar_scales():
    qmodel = quantize(mobilenet_block_model(), CALIB, per_tensor=True, show_progress=False)
    assert_lint_clean(qmodel)
    initializers = {t.name for t in qmodel.graph.initializer}
    weight_dqs = [n for n in q_dq_of(qmodel, "DequantizeLinear") if n.input[0] in initializers]
    assert len(weight_dqs) == 5  # 4 convs + the classifier
    assert all(init(qmodel, n.input[1]).ndim == 0 for n in weight_dqs)


def test_metadata_records_what_ran_and_names_stay_meaningful():
    qmodel = quantize(mobilenet_block_model(), CALIB, show_progress=False)
    assert_lint_clean(qmodel)
    props = {p.key: p.value for p in qmodel.metadata_props}
    record = json.loads(props["onnxq.passes"])
    assert [r["name"] for r in record] == ["lift_constants", "fold_constants", "upgrade_opset", "fold_batchnorm",
                                           "equalize", "quantize", "recentre"]
    assert record[-1]["kind"] == "approximate" and record[3]["max_rel_change"] < 1e-4
    assert props["onnxq.target"] == "tensorrt" and props["onnxq.recipe"] == "default"
    names = {n.name for n in qmodel.graph.node}
    assert {"expand/Conv", "expand.weight_DequantizeLinear", "stem.act_QuantizeLinear"} <= names
    kept = [n for n in qmodel.graph.node if any(p.key == "onnxq.float_reason" for p in n.metadata_props)]
    assert {n.op_type for n in kept} >= {"GlobalAveragePool", "Flatten"}


def test_attention_mask_is_never_quantized():
    """ORT's quantizer wrecks BERT by quantizing the mask's finfo.min; onnxq must keep it float."""
    model = attention_model()
    rng = np.random.default_rng(0)
    mask = np.ones((16, 8), np.int64)
    mask[::2, 5:] = 0  # padded calibration samples, as real batches have
    calib = {"hidden": rng.normal(size=(16, 8, 16)).astype(np.float32), "attention_mask": mask}
    qmodel = quantize(model, calib, show_progress=False)
    graph = ir.from_proto(qmodel).graph
    scales = [float(const_array(n.inputs[1]).max()) for n in graph if n.op_type == "QuantizeLinear"]
    assert max(scales) < 1.0  # no scale anywhere near finfo.min / 127
    masked_add = next(n for n in graph if n.name == "scores/Add")
    assert all(v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in masked_add.inputs)
    feed = {k: v[:4] for k, v in calib.items()}
    assert sqnr_db(run(model, feed)[0], run(qmodel, feed)[0]) > 20
    assert_lint_clean(qmodel)


@pytest.mark.parametrize("mask_value", [-10000.0, float("-inf")])
def test_other_mask_constants(mask_value):
    model = attention_model(mask_value=mask_value) if np.isfinite(mask_value) else attention_model(mask_value=-1e30)
    calib = {"hidden": np.random.default_rng(0).normal(size=(4, 8, 16)).astype(np.float32),
             "attention_mask": np.ones((4, 8), np.int64)}
    qmodel = quantize(model, calib, show_progress=False)
    assert_lint_clean(qmodel)
    assert "scores/Add" not in {n.name for n in qmodel.graph.node if n.input[0].endswith("_dequantized")}


def test_concat_inputs_share_one_scale():
    qmodel = quantize(concat_model(), {"input": random_images(16, size=8)}, show_progress=False)
    graph = ir.from_proto(qmodel).graph
    concat = next(n for n in graph if n.op_type == "Concat")
    scales = {float(const_array(v.producer().inputs[1])) for v in concat.inputs if v.producer().op_type == "DequantizeLinear"}
    after = [u for u in concat.outputs[0].consumers() if u.op_type == "QuantizeLinear"]
    scales |= {float(const_array(u.inputs[1])) for u in after}
    assert len(scales) == 1 and after
    assert_lint_clean(qmodel)


def test_ort_cpu_target_uses_uint8_asymmetric_activations():
    model = mobilenet_block_model()
    qmodel = quantize(model, CALIB, target="ort-cpu", show_progress=False)
    graph = ir.from_proto(qmodel).graph
    act_zps = [const_array(n.inputs[2]) for n in graph if n.op_type == "QuantizeLinear"]
    assert act_zps and all(z.dtype == np.uint8 for z in act_zps)
    assert any(z != 0 for z in act_zps)
    assert sqnr_db(run(model, EVAL)[0], run(qmodel, EVAL)[0]) > 25


def test_int4_weights():
    steps = ["fold_batchnorm", {"upgrade_opset": {"opset": 21}}, {"quantize": {"weight_bits": 4}}]
    qmodel = quantize(mobilenet_block_model(), CALIB, recipe=steps, show_progress=False)
    int4 = [t for t in qmodel.graph.initializer if t.data_type == onnx.TensorProto.INT4 and len(t.dims) >= 2]
    assert len(int4) == 5
    assert sqnr_db(run(mobilenet_block_model(), EVAL)[0], run(qmodel, EVAL)[0]) > 10
    assert_lint_clean(qmodel)


def test_weights_in_constant_nodes_quantize():
    qmodel = quantize(mobilenet_block_model(weights_as_constants=True), CALIB, show_progress=False)
    assert len([t for t in qmodel.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]) == 5
    assert_lint_clean(qmodel)


def test_fixed_batch_model():
    model = mobilenet_block_model(batch=4)
    qmodel = quantize(model, CALIB, show_progress=False)
    assert_lint_clean(qmodel)
    feed = {"input": EVAL["input"][:4]}
    assert sqnr_db(run(model, feed)[0], run(qmodel, feed)[0]) > 25


def test_unknown_op_is_an_error_unless_allowed():
    model = mobilenet_block_model()
    model.opset_import.append(onnx.helper.make_opsetid("custom.domain", 1))
    model.graph.node.append(onnx.helper.make_node("Mystery", ["logits"], ["mystery"], domain="custom.domain", name="mystery"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("mystery", onnx.TensorProto.FLOAT, None))
    with pytest.raises(OnnxqError, match="no QDQ rule") as err:
        quantize(model, CALIB, recipe=["fold_batchnorm", "quantize"], verify_exact=False, show_progress=False)
    assert "custom.domain::Mystery" in str(err.value)


def test_already_quantized_model_is_refused():
    qmodel = quantize(mobilenet_block_model(), CALIB, show_progress=False)
    del qmodel.metadata_props[:]  # a QDQ model from another tool
    with pytest.raises(OnnxqError, match="already contains"):
        quantize(qmodel, CALIB, show_progress=False)


def test_bad_recipes():
    for recipe, message in [("no-such-recipe", "neither a file nor a built-in"), (["no_such_pass"], "unknown pass"),
                            ([{"quantize": {"colour": "red"}}], "has no option 'colour'"),
                            ([{"quantize": {"calibrator": "magic"}}], "calibrator.*is not one of")]:
        with pytest.raises(OnnxqError, match=message):
            quantize(mobilenet_block_model(), CALIB, recipe=recipe, show_progress=False)


def test_caller_model_is_not_modified():
    model = mobilenet_block_model()
    before = model.SerializeToString()
    quantize(model, CALIB, show_progress=False)
    assert model.SerializeToString() == before


def test_auto_weight_calibrator_clips_per_tensor_only():
    from onnxq.quant.qdq import INT8_WEIGHT, quantize_weight

    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    w[0, 0] = 40.0  # one outlier sets the per-tensor step: mse clips it
    for axis in (1, None):
        auto = quantize_weight(w, axis, INT8_WEIGHT, "auto")[1]
        expected = quantize_weight(w, axis, INT8_WEIGHT, "max" if axis is not None else "mse")[1]
        np.testing.assert_array_equal(auto, expected)
    assert quantize_weight(w, None, INT8_WEIGHT, "mse")[1] < quantize_weight(w, None, INT8_WEIGHT, "max")[1]
