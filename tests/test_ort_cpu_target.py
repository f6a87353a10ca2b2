"""--target ort-cpu: what ONNX Runtime's CPU provider leaves after its own Q/DQ fusions.

The model is built here with the pieces of PP-OCR's backbone that used to stay in float: a Conv
followed by a scalar affine (Mul, Add), hard-swish written as x·Clip(x + 3, 0, 6)/6, a squeeze-and-
excitation gate with HardSigmoid, a ReLU after a residual Add, and a ConvTranspose head. The test
reads the graph ORT itself optimised (SessionOptions.optimized_model_filepath).
"""

import dataclasses
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import conv_weights, detector_and_classifier_model
from conftest import run, sqnr_db
from onnxq import quantize
from onnxq.errors import OnnxqError
from onnxq.quant import targets
from onnxq.quant.ort_cpu import prepare

C = 8


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def ppocr_like_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name, x, cin, k=3, group=1, bias=True):
        inits.append(_init(f"{name}.w", conv_weights(rng, C, cin, k, group)))
        inputs = [x, f"{name}.w"]
        if bias:
            inits.append(_init(f"{name}.b", rng.normal(size=C) * 0.2))
            inputs.append(f"{name}.b")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}.y"], name=f"{name}/Conv", pads=[k // 2] * 4,
                                      group=group))
        return f"{name}.y"

    def affine(name, x):  # a learnable affine block: scalar scale and shift after the conv
        inits.extend([_init(f"{name}.scale", [1.3]), _init(f"{name}.shift", [-0.2])])
        nodes.append(helper.make_node("Mul", [x, f"{name}.scale"], [f"{name}.mul"], name=f"{name}/Mul"))
        nodes.append(helper.make_node("Add", [f"{name}.mul", f"{name}.shift"], [f"{name}.add"], name=f"{name}/Add"))
        return f"{name}.add"

    def hardswish(name, x):
        nodes.extend([helper.make_node("Add", [x, "three"], [f"{name}.p3"], name=f"{name}/Add"),
                      helper.make_node("Clip", [f"{name}.p3", "zero", "six"], [f"{name}.r6"], name=f"{name}/Clip"),
                      helper.make_node("Mul", [x, f"{name}.r6"], [f"{name}.m"], name=f"{name}/Mul"),
                      helper.make_node("Div", [f"{name}.m", "six"], [f"{name}.y"], name=f"{name}/Div")])
        return f"{name}.y"

    inits.extend([_init("three", 3.0), _init("six", 6.0), _init("zero", 0.0)])
    x = hardswish("hs1", affine("a1", conv("c1", "input", 3, bias=False)))
    x = hardswish("hs2", affine("a2", conv("c2", x, C, group=C)))
    # squeeze-and-excitation: GAP → 1x1 conv → ReLU → 1x1 conv → HardSigmoid → Mul
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["se.gap"], name="se/GlobalAveragePool"))
    s = conv("se1", "se.gap", C, k=1)
    nodes.append(helper.make_node("Relu", [s], ["se.relu"], name="se/Relu"))
    s = conv("se2", "se.relu", C, k=1)
    nodes.append(helper.make_node("HardSigmoid", [s], ["se.gate"], name="se/HardSigmoid", alpha=0.2, beta=0.5))
    nodes.append(helper.make_node("Mul", [x, "se.gate"], ["se.y"], name="se/Mul"))
    y = conv("c3", "se.y", C, k=1)
    nodes.append(helper.make_node("Add", [y, x], ["res"], name="res/Add"))
    nodes.append(helper.make_node("Relu", ["res"], ["res.relu"], name="res/Relu"))
    inits.append(_init("up.w", rng.normal(size=(C, 1, 2, 2)) * 0.3))
    nodes.append(helper.make_node("ConvTranspose", ["res.relu", "up.w"], ["up"], name="up/ConvTranspose",
                                  strides=[2, 2]))
    nodes.append(helper.make_node("Sigmoid", ["up"], ["output"], name="out/Sigmoid"))
    graph = helper.make_graph(nodes, "ppocr_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def images(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


CALIB, EVAL = {"input": images(32, 1)}, {"input": images(8, 2)}


def ort_optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs (basic + extended fusions; the CPU-specific layout pass off,
    so the saved graph holds standard ops and ORT's contrib ops only)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


@pytest.fixture(scope="module")
def quantized():
    return quantize(ppocr_like_model(), CALIB, target="ort-cpu", show_progress=False)


def test_ort_fuses_every_quantized_op(quantized, tmp_path):
    graph = ort_optimized(quantized, tmp_path).graph
    ops = Counter(n.op_type for n in graph.node)
    # every Conv, SE convs included, but the stem: 3 channels read from the model input stay float
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 1
    assert ops["QLinearAdd"] >= 3 and ops["QLinearMul"] >= 3  # hard-swish's + 3 and · x/6, the residual
    # no hard-swish, affine or ReLU piece left in float between the quantized convs
    assert not {"Div", "Clip", "Relu", "Add", "Mul"} & set(ops), ops
    # DQ left only where ORT has no integer kernel: the SE gate's HardSigmoid and the float ConvTranspose
    # head (its input, and the DQ ORT itself puts on its weight); the head's Sigmoid writes the float
    # output and reads the float ConvTranspose, so no Q/DQ pair sits between them
    readers = Counter(n.op_type for dq in graph.node if dq.op_type == "DequantizeLinear"
                      for n in graph.node if dq.output[0] in n.input)
    assert set(readers) <= {"HardSigmoid", "ConvTranspose", "Sigmoid"} and ops["DequantizeLinear"] <= 4, readers
    assert ops["HardSigmoid"] == 1 and ops["ConvTranspose"] == 1


def test_ort_cpu_output_is_close_to_float(quantized):
    reference = run(ppocr_like_model(), EVAL)[0]
    assert sqnr_db(reference, run(quantized, EVAL)[0]) > 25


def test_prepare_rewrites_are_float_exact_to_rounding():
    import onnx_ir as ir

    model = ir.from_proto(onnx.shape_inference.infer_shapes(ppocr_like_model()))
    counts = prepare(model)
    # hs1's /6 is read by the depthwise conv alone and folds into its weights; hs2's output is also
    # read by the SE block and the residual Add, so its /6 stays a (quantized) Mul
    assert counts == {"folded_into_conv": 4, "div_to_mul": 2, "layer_outputs_given_a_reader": 0, "folded_into_next_conv": 1, "scalar_operands_quantized": 3}
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Div"] == 0 and ops["Conv"] == 5
    assert all(v.uses() for v in model.graph.initializers.values())  # replaced constants are dropped
    prepared = run(ir.to_proto(model), EVAL)[0]
    np.testing.assert_allclose(prepared, run(ppocr_like_model(), EVAL)[0], rtol=1e-5, atol=1e-5)


def test_tensorrt_target_keeps_the_graph_as_it_is():
    qmodel = quantize(ppocr_like_model(), CALIB, show_progress=False)
    ops = Counter(n.op_type for n in qmodel.graph.node)
    assert ops["Div"] == 2 and ops["Conv"] == 5  # no ort-cpu rewrite


def test_mask_sized_scalar_stays_a_float_constant():
    """An attention-mask constant (-1e9) must stay visible to the planner, which keeps masked data float."""
    import onnx_ir as ir

    nodes = [helper.make_node("Add", ["input", "mask"], ["masked"], name="mask/Add"),
             helper.make_node("Softmax", ["masked"], ["output"], name="Softmax", axis=-1)]
    graph = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4])],
                              [_init("mask", -1e9)])
    model = ir.from_proto(onnx.shape_inference.infer_shapes(helper.make_model(graph)))
    assert prepare(model)["scalar_operands_quantized"] == 0
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)


def test_int8_activations_are_int8_throughout_and_stay_close(tmp_path):
    recipe = [{"include": "default", "override": {"quantize": {"activation_type": "int8"}}}]
    signed = quantize(ppocr_like_model(), CALIB, target="ort-cpu", recipe=recipe, show_progress=False)
    types = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in signed.graph.initializer
             if t.name.endswith("zero_point") and any(t.name == n.input[2] for n in signed.graph.node
                                                      if n.op_type == "QuantizeLinear")}
    assert types == {np.dtype(np.int8)}
    # ORT's x86 CPU kernels fuse fewer S8S8 groups than U8S8 ones: what docs/ort-cpu.md states
    ops = Counter(n.op_type for n in ort_optimized(signed, tmp_path).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == ops["QLinearMul"] == 0, ops
    reference = run(ppocr_like_model(), EVAL)[0]
    assert sqnr_db(reference, run(signed, EVAL)[0]) > 25


def test_tensorrt_refuses_uint8_activations():
    recipe = [{"include": "default", "override": {"quantize": {"activation_type": "uint8"}}}]
    with pytest.raises(OnnxqError, match="takes int8 activations only, not uint8"):
        quantize(ppocr_like_model(), CALIB, target="tensorrt", recipe=recipe, show_progress=False)


def test_uint8_weights_dequantize_to_the_int8_values_and_fuse(quantized, tmp_path):
    unsigned = quantize(ppocr_like_model(), CALIB, target="ort-cpu", weight_type="uint8", show_progress=False)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in unsigned.graph.initializer}
    signed = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    weight_dqs = [n for n in unsigned.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in arrays
                  and arrays[n.input[0]].ndim == 4]  # the Conv kernels
    assert weight_dqs
    for dq in weight_dqs:
        codes, zero_point = arrays[dq.input[0]], arrays[dq.input[2]]
        assert codes.dtype == np.uint8 and np.all(zero_point == 128)
        # the same dequantized weights as the int8 model's: the stored codes are shifted, nothing else
        np.testing.assert_array_equal(codes.astype(np.int16) - 128, signed[dq.input[0]].astype(np.int16))
    ops = Counter(n.op_type for n in ort_optimized(unsigned, tmp_path).graph.node)
    assert ops["QLinearConv"] >= 3, ops
    np.testing.assert_allclose(run(unsigned, EVAL)[0], run(quantized, EVAL)[0], rtol=1e-4, atol=1e-4)


def test_uint8_weights_are_refused_for_tensorrt():
    with pytest.raises(OnnxqError, match="TensorRT takes signed weights only"):
        quantize(ppocr_like_model(), CALIB, weight_type="uint8", show_progress=False)


def _conv_with_dead_channel() -> onnx.ModelProto:
    """Conv → ReLU → Conv → Sigmoid, the second Conv's channel 1 having weights a million times smaller than its bias: with its own
    per-channel step, b / (s_x·s_w) passes int32."""
    rng = np.random.default_rng(3)
    w1, w2 = conv_weights(rng, C, 3, 3, 1), conv_weights(rng, C, C, 1, 1)
    w2[1] *= 1e-6
    bias = rng.normal(size=C).astype(np.float32) * 0.2
    bias[1] = 2.0
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c"], name="c2"),
             helper.make_node("Sigmoid", ["c"], ["output"], name="sigmoid")]
    graph = helper.make_graph(nodes, "dead_channel", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                     ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [_init("w1", w1), _init("w2", w2), _init("b2", bias)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _quantize_summary(model: onnx.ModelProto) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    return next(r for r in json.loads(meta["onnxq.passes"]) if r["name"] == "quantize")["summary"]


def test_an_overflowing_bias_widens_the_channel_step_so_ort_still_fuses_the_conv(tmp_path, monkeypatch):
    """TensorRT takes a bias moved to an Add after its layer; ORT's CPU provider would leave that layer
    in float. For ort-cpu the dead channel's weight step grows until the bias fits int32 instead."""
    model = _conv_with_dead_channel()
    quantized = quantize(model, CALIB, target="ort-cpu", show_progress=False)
    summary = _quantize_summary(quantized)
    assert summary["weight_scales_widened_for_bias"] == 1 and "biases_moved_to_add" not in summary
    ops = Counter(n.op_type for n in ort_optimized(quantized, tmp_path).graph.node)
    # c2, the layer with the dead channel, fused; c1 is the float stem (3 channels from the model input)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 1 and "Add" not in ops, ops
    reference, got = run(model, EVAL)[0], run(quantized, EVAL)[0]
    # as accurate as leaving the bias to a float Add (the old way, which left the Conv in float)
    monkeypatch.setitem(targets.TARGETS, "ort-cpu", dataclasses.replace(targets.TARGETS["ort-cpu"], fit_biases=None))
    detached = quantize(model, CALIB, target="ort-cpu", show_progress=False)
    assert _quantize_summary(detached)["biases_moved_to_add"] == 1
    assert sqnr_db(reference, got) > sqnr_db(reference, run(detached, EVAL)[0]) - 0.3 > 20
    monkeypatch.undo()
    np.testing.assert_allclose(got[:, 1], reference[:, 1], atol=0.01)  # the bias-only channel: σ(2), not garbage
    for_tensorrt = _quantize_summary(quantize(model, CALIB, show_progress=False))
    assert for_tensorrt["biases_moved_to_add"] == 1  # TensorRT fuses the Add: moved as before


def _reader(graph, value: str):
    return [n for n in graph.node if value in n.input]


def _producer(graph, value: str):
    return next((n for n in graph.node if value in n.output), None)


def test_float_islands_get_no_qdq_and_the_classifier_fuses(tmp_path):
    """What ORT runs: the detector head after its input DQ is all float (no Q/DQ pair between ops
    without an integer kernel), the Gemm writing the logits is a QGemm, the stem Conv stays integer
    because a MaxPool reads it, and a MaxPool runs on the integers only right after a quantized Conv."""
    model = detector_and_classifier_model()
    quantized = quantize(model, CALIB, target="ort-cpu", show_progress=False)
    summary = _quantize_summary(quantized)
    assert summary["layer_outputs_given_a_reader"] == 1 and summary["idle_qdq_dropped"] >= 2, summary
    graph = ort_optimized(quantized, tmp_path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QGemm"] == 1 and not {"Gemm", "MatMul", "BatchNormalization"} & set(ops), ops
    assert ops["QLinearConv"] == 3 and ops["Conv"] + ops["FusedConv"] == 0 and ops["ConvTranspose"] == 2, ops
    head = [n for n in graph.node if n.op_type in ("ConvTranspose", "Relu", "Sigmoid")]
    fed_by_dq = [n.op_type for n in head if (p := _producer(graph, n.input[0])) is not None
                 and p.op_type == "DequantizeLinear"]
    assert fed_by_dq == ["ConvTranspose"], fed_by_dq  # the head's first op only
    assert not any(n.op_type == "QuantizeLinear" for h in head for n in _reader(graph, h.output[0]))
    pools = {n.name: _producer(graph, n.input[0]).op_type for n in graph.node if n.op_type == "MaxPool"}
    assert pools == {"stem/MaxPool": "QLinearConv", "cls/MaxPool": "QLinearConv", "res/MaxPool": "DequantizeLinear"}
    reference, got = run(model, EVAL), run(quantized, EVAL)
    assert sqnr_db(reference[0], got[0]) > 25 and sqnr_db(reference[1], got[1]) > 25


def test_prepare_folds_convtranspose_affines_exactly():
    """After fold_batchnorm: the head's uneven per-channel scale folds into the grouped ConvTranspose
    before it, and the scalar gain into the last one."""
    import onnx_ir as ir

    from onnxq.pipeline import PassContext, load_recipe, run_pipeline

    model = ir.from_proto(onnx.shape_inference.infer_shapes(detector_and_classifier_model()))
    _, passes = load_recipe(["fold_batchnorm"])
    run_pipeline(model, passes, PassContext(show_progress=False), verify_exact=False)
    counts = prepare(model)
    assert counts["folded_into_conv"] == 2 and counts["layer_outputs_given_a_reader"] == 1, counts
    ops = Counter(n.op_type for n in model.graph)
    assert not {"BatchNormalization", "Mul"} & set(ops) and ops["Add"] == 2, ops  # residual, cls
    got, reference = run(ir.to_proto(model), EVAL), run(detector_and_classifier_model(), EVAL)
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_a_float_maxpool_keeps_its_input_pair(tmp_path):
    """ConvTranspose (float) → MaxPool → Conv: the MaxPool stays float, and its input keeps a Q/DQ pair
    although no integer kernel writes it. Without that DQ, ORT moves the Conv's input Q above the
    MaxPool and runs its 8-bit NCHW MaxPool loop (7 ms against 0.16 ms in float on a ResNet stem)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("ConvTranspose", ["a", "up"], ["b"], name="up", strides=[2, 2]),
             helper.make_node("MaxPool", ["b"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["output"], name="c2")]
    inits = [_init("w1", conv_weights(rng, C, 3, 3)), _init("up", rng.normal(size=(C, C, 2, 2)) * 0.3),
             _init("w2", conv_weights(rng, C, C, 1))]
    graph = helper.make_graph(nodes, "pool_after_float", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                        ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    quantized = quantize(model, CALIB, target="ort-cpu", show_progress=False)
    optimized = ort_optimized(quantized, tmp_path).graph
    pool = next(n for n in optimized.node if n.op_type == "MaxPool")
    assert _producer(optimized, pool.input[0]).op_type == "DequantizeLinear"
    assert sqnr_db(run(model, EVAL)[0], run(quantized, EVAL)[0]) > 25
