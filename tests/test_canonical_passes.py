"""The canonicalisation and equalisation passes are exact: FP32 outputs unchanged, job done."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import detector_and_classifier_model, mobilenet_block_model, random_images
from conftest import rel_change, run
from onnxq.ir.graph import const_array
from onnxq.pipeline import PassContext, load_recipe, run_pipeline

X = random_images(4)


def apply(model: onnx.ModelProto, steps: list, **kw) -> tuple[ir.Model, list]:
    work = ir.from_proto(model)
    _, passes = load_recipe(steps)
    records = run_pipeline(work, passes, PassContext(show_progress=False), verify_exact=False, **kw)
    return work, records


def outputs(model) -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return run(proto, {"input": X})[0]


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_lift_constants_moves_weights_out_of_constant_nodes():
    model = mobilenet_block_model(weights_as_constants=True)
    work, _ = apply(model, ["lift_constants"])
    left = [const_array(n.outputs[0]).size for n in work.graph if n.op_type == "Constant"]
    assert left and max(left) == 1  # only scalar operator arguments (Clip bounds) stay Constant nodes
    assert "expand.weight" in work.graph.initializers
    assert rel_change(outputs(model), outputs(work)) == 0


def test_fold_batchnorm_and_names_survive():
    model = mobilenet_block_model()
    work, records = apply(model, ["fold_batchnorm"])
    assert "BatchNormalization" not in ops(work)
    assert records[0].summary["batchnorms_folded"] == 4
    assert {"stem/Conv", "depthwise/Conv"} <= {n.name for n in work.graph}  # the fused conv keeps its name
    assert rel_change(outputs(model), outputs(work)) < 1e-5


def test_fold_constants_folds_weight_arithmetic():
    model = mobilenet_block_model()
    # an exporter-style weight transpose left in the graph: Transpose(W^T) feeding the Gemm
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.weight"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(w.T.copy(), "fc.weight_t"))
    model.graph.node.insert(0, onnx.helper.make_node("Transpose", ["fc.weight_t"], ["fc.weight_folded"], name="fc/T"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.input[1] = "fc.weight_folded"
    work, _ = apply(model, ["fold_constants"])
    assert "Transpose" not in ops(work)
    assert const_array(next(n for n in work.graph if n.op_type == "Gemm").inputs[1]) is not None
    assert rel_change(outputs(model), outputs(work)) < 1e-6


@pytest.mark.parametrize("opset", [11, 13])
def test_upgrade_opset_keeps_results(opset):
    model = mobilenet_block_model(opset=opset)
    if opset == 11:  # opset 11 Clip takes its bounds as inputs already; keep the model valid at 11
        onnx.checker.check_model(model)
    work, _ = apply(model, [{"upgrade_opset": {"opset": 19}}])
    assert work.opset_imports[""] == 19
    assert rel_change(outputs(model), outputs(work)) < 1e-6


@pytest.mark.parametrize("relu6", [True, False])
def test_equalize_is_exact_and_equalises_channel_ranges(relu6):
    model = mobilenet_block_model(relu6=relu6)
    work, records = apply(model, ["fold_batchnorm", {"equalize": {"iterations": 20}}])
    assert records[1].summary["pairs_equalised"] == 2  # expand→depthwise, depthwise→project
    assert rel_change(outputs(model), outputs(work)) < 1e-5
    convs = {n.name: n for n in work.graph if n.op_type == "Conv"}
    w1, w2 = const_array(convs["expand/Conv"].inputs[1]), const_array(convs["depthwise/Conv"].inputs[1])
    r1 = np.abs(w1).reshape(len(w1), -1).max(1)
    r2 = np.abs(w2).reshape(len(w2), -1).max(1)  # depthwise: input channel i is output channel i
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    if relu6:  # ReLU6 became Relu + Min with a per-channel bound, the exact form under rescaling
        mins = [n for n in work.graph if n.op_type == "Min"]
        assert mins and all(const_array(n.inputs[1]).shape == (32, 1, 1) for n in mins)


def test_equalize_reduces_per_tensor_weight_error():
    """Why the pass exists: after it, one scale per depthwise weight tensor loses much less."""
    from onnxq.quant.qdq import quantize_weight

    def depthwise_error(work):
        w = const_array(next(n for n in work.graph if n.name == "depthwise/Conv").inputs[1])
        q, s = quantize_weight(w, None)
        per_channel = np.sum((q * s - w) ** 2, axis=(1, 2, 3)) / np.sum(w ** 2, axis=(1, 2, 3))
        return float(per_channel.mean())  # small channels drown in one shared scale

    before, _ = apply(mobilenet_block_model(), ["fold_batchnorm"])
    after, _ = apply(mobilenet_block_model(), ["fold_batchnorm", "equalize"])
    assert depthwise_error(after) < 0.2 * depthwise_error(before)


def test_pipeline_refuses_an_exact_pass_that_changes_outputs():
    from dataclasses import dataclass
    from typing import ClassVar

    from onnxq.errors import OnnxqError
    from onnxq.ir.graph import replace_initializer
    from onnxq.pipeline import GraphPass, Kind

    @dataclass
    class Broken(GraphPass):
        name: ClassVar[str] = "broken"
        kind: ClassVar[Kind] = Kind.EXACT

        def apply(self, model, ctx):
            w = model.graph.initializers["fc.bias"]
            replace_initializer(w, const_array(w) + 1.0)
            return {}

    from onnxq.stats.calib_data import load_calibration

    work = ir.from_proto(mobilenet_block_model())
    ctx = PassContext(calibration=load_calibration({"input": X}, work), show_progress=False)
    with pytest.raises(OnnxqError, match="declared exact but changed the outputs"):
        run_pipeline(work, [Broken()], ctx)


def test_fold_batchnorm_takes_a_bias_add_between_layer_and_bn():
    """Paddle writes a ConvTranspose's bias as an Add of its own, between the layer and its BN: the Add
    goes into the layer's bias, then the BN folds (grouped ConvTranspose, per-channel bias)."""
    model = detector_and_classifier_model()
    work, records = apply(model, ["fold_batchnorm"])
    assert "BatchNormalization" not in ops(work)
    assert records[0].summary == {"bias_adds_absorbed": 1, "batchnorms_folded": 1, "batchnorms_left": 0}
    feed = {"input": X[:, :3, :16, :16]}
    for got, reference in zip(run(ir.to_proto(work), feed), run(model, feed)):
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_keeps_an_fp16_layer_fp16():
    """The absorbed bias is stored in the layer's float type: an FP16 model stays valid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    half = [numpy_helper.from_array(a.astype(np.float16), n) for n, a in (
        ("w", rng.normal(size=(4, 3, 3, 3))), ("c", rng.normal(size=(4, 1, 1))), ("scale", rng.uniform(0.5, 1.5, 4)),
        ("bias", rng.normal(size=4)), ("mean", rng.normal(size=4)), ("var", rng.uniform(0.5, 2.0, 4)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
             helper.make_node("Add", ["y", "c"], ["yc"], name="bias"),
             helper.make_node("BatchNormalization", ["yc", "scale", "bias", "mean", "var"], ["out"], name="bn")]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)], half)
    work, records = apply(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          ["fold_batchnorm"])
    assert ops(work) == ["Conv"] and records[0].summary["bias_adds_absorbed"] == 1
    conv = next(iter(work.graph))
    assert const_array(conv.inputs[2]).dtype == np.float16
    onnx.checker.check_model(ir.to_proto(work), full_check=True)
