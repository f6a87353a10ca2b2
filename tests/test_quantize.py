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


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_head_bits_keep_the_output_layer_wider(target):
    """head_bits 8 with INT4 weights: the classifier (the Gemm writing the model output) is stored INT8,
    every other weight INT4; the head's weight is then far nearer the float one, and the model runs."""
    steps = ["fold_batchnorm", {"upgrade_opset": {"opset": 21}}, {"quantize": {"weight_bits": 4, "head_bits": 8}}]
    model = mobilenet_block_model()
    float_head = init(model, "fc.weight")

    def head_weight_error(qmodel):
        graph = ir.from_proto(qmodel).graph
        dq = next(n for n in graph if n.op_type == "Gemm").inputs[1].producer()
        q, scale = const_array(dq.inputs[0]), const_array(dq.inputs[1])
        dequantized = q.astype(np.float32) * scale.reshape(-1, 1)  # per output channel (axis 0, transB)
        return q.dtype, float(np.linalg.norm(dequantized - float_head) / np.linalg.norm(float_head))

    qmodel = quantize(model, CALIB, recipe=steps, target=target, show_progress=False)
    plain = quantize(model, CALIB, recipe=[*steps[:2], {"quantize": {"weight_bits": 4}}], target=target,
                     show_progress=False)
    (wide_dtype, wide_error), (narrow_dtype, narrow_error) = head_weight_error(qmodel), head_weight_error(plain)
    assert (wide_dtype, narrow_dtype) == (np.int8, ir.DataType.INT4.numpy())
    assert wide_error < 0.2 * narrow_error, (wide_error, narrow_error)
    convs = {n.inputs[1].producer().inputs[0].dtype for n in ir.from_proto(qmodel).graph
             if n.op_type == "Conv" and n.inputs[1].producer() is not None}  # ort-cpu keeps a 3-channel stem float
    assert convs == {ir.DataType.INT4}
    assert sqnr_db(run(model, EVAL)[0], run(qmodel, EVAL)[0]) > 10
    if target == "tensorrt":
        assert_lint_clean(qmodel)


def test_the_output_layer_is_found_through_a_bias_add_and_a_softmax():
    """A MatMul head whose output reaches the model output through a bias Add and a Softmax is the output
    layer; a layer before a residual Add of two activations is not."""
    from onnxq.passes.quant.quantize import _output_layers

    rng = np.random.default_rng(0)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    inits = [onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (8, 8)), ("w2", (8, 4)), ("b2", (4,)))]
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="inner"),
             onnx.helper.make_node("Add", ["h", "x"], ["r"], name="residual"),
             onnx.helper.make_node("MatMul", ["r", "w2"], ["z"], name="head"),
             onnx.helper.make_node("Add", ["z", "b2"], ["zb"], name="bias"),
             onnx.helper.make_node("Softmax", ["zb"], ["probs"], name="softmax")]
    outputs = [onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [2, 4]),
               onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 8])]
    graph = onnx.helper.make_graph(nodes, "g", [x], outputs, inits)
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    assert {n.name for n in _output_layers(model.graph)} == {"head"}


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


def test_blocked_int4_mse_clips_each_block_and_weights_it_by_its_inputs(monkeypatch):
    """INT4 blocks with weight_calibrator mse: each block's clip lowers its squared error below max's;
    with input importances, the importance-weighted error (the layer's output error for uncorrelated
    inputs) is lower than unweighted mse gives. Searching a few channels at a time changes nothing."""
    from onnxq.quant import qdq
    from onnxq.quant.qdq import INT4_WEIGHT, quantize_weight, scale_per_element

    rng = np.random.default_rng(5)
    w = rng.standard_t(4, size=(128, 48)).astype(np.float32)  # MatMul layout: in × out, blocks along the input
    importance = np.geomspace(0.01, 100.0, 128)[rng.permutation(128)].astype(np.float32)

    def errors(q, scale):
        e = (q.astype(np.float32) * scale_per_element(scale, w.shape, 1, 32) - w) ** 2
        return float(e.sum()), float((e * importance[:, None]).sum())

    plain_max, plain_mse = (errors(*quantize_weight(w, 1, INT4_WEIGHT, m, 32)) for m in ("max", "mse"))
    weighted = quantize_weight(w, 1, INT4_WEIGHT, "mse", 32, importance)
    assert plain_mse[0] < 0.95 * plain_max[0], (plain_mse, plain_max)
    assert errors(*weighted)[1] < 0.95 * plain_mse[1], (errors(*weighted), plain_mse)
    assert quantize_weight(w, 1, INT4_WEIGHT, "auto", 32)[1].tolist() == quantize_weight(w, 1, INT4_WEIGHT, "max", 32)[1].tolist()
    monkeypatch.setattr(qdq, "MSE_CHUNK_ELEMENTS", 4 * 32 * 5)  # 5 channels per search step, the last step short
    np.testing.assert_array_equal(quantize_weight(w, 1, INT4_WEIGHT, "mse", 32, importance)[1], weighted[1])
