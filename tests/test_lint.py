"""The linter catches each TensorRT Q/DQ rule violation on hand-broken models, and passes clean ones."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import concat_model, mobilenet_block_model, random_images
from onnxq import quantize
from onnxq.quant.lint import lint, passed

CALIB = {"input": random_images(8, seed=1)}


@pytest.fixture(scope="module")
def clean():
    return quantize(mobilenet_block_model(), CALIB, show_progress=False)


def status(model: onnx.ModelProto) -> dict[str, str]:
    return {r.rule: r.status for r in lint(ir.from_proto(model))}


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def set_init(model, name, array):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array, name))


def test_clean_model_passes(clean):
    assert passed(lint(ir.from_proto(clean)))
    assert set(status(clean).values()) == {"pass"}


def test_nonzero_zero_point(clean):
    bad = copy(clean)
    set_init(bad, "stem.act_zero_point", np.array(3, np.int8))
    assert status(bad)["R1"] == "FAIL"


def test_uint8_activations_and_per_axis_activation_scales():
    ort_model = quantize(mobilenet_block_model(), CALIB, target="ort-cpu", show_progress=False)
    s = status(ort_model)
    assert s["R1"] == "FAIL" and s["R1b"] == "FAIL"


def test_per_axis_activation_scale(clean):
    bad = copy(clean)
    set_init(bad, "stem.act_scale", np.full(8, 0.05, np.float32))
    for n in bad.graph.node:
        if n.name in ("stem.act_QuantizeLinear", "stem.act_DequantizeLinear"):
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
    set_init(bad, "stem.act_zero_point", np.zeros(8, np.int8))
    assert status(bad)["R3"] == "FAIL"


def test_nonpositive_scale(clean):
    bad = copy(clean)
    set_init(bad, "stem.act_scale", np.array(0.0, np.float32))
    assert status(bad)["R2"] == "FAIL"


def test_unquantized_conv_input(clean):
    bad = copy(clean)
    conv = next(n for n in bad.graph.node if n.name == "expand/Conv")
    conv.input[0] = "stem.act"
    assert status(bad)["R8"] == "FAIL"


def test_qoperator_ops_and_old_opset():
    import os
    import tempfile

    from onnxruntime.quantization import QuantFormat, quantize_static  # QOperator output from ORT's own tool

    class Reader:
        def __init__(self):
            self.it = iter([{"input": random_images(1, seed=i)} for i in range(2)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "q.onnx")
        onnx.save(mobilenet_block_model(opset=13), src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator)
        assert status(onnx.load(dst))["R4"] == "FAIL"


def test_mismatched_q_dq_pair(clean):
    bad = copy(clean)
    dq = next(n for n in bad.graph.node if n.name == "stem.act_DequantizeLinear")
    bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "other_scale"))
    dq.input[1] = "other_scale"
    assert status(bad)["QDQ"] == "FAIL"


def test_concat_scales_must_match():
    model = quantize(concat_model(), {"input": random_images(8, size=8)}, show_progress=False)
    bad = copy(model)
    scale_name = next(n.input[1] for n in bad.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "b")
    set_init(bad, scale_name, np.array(123.0, np.float32))
    for n in bad.graph.node:  # keep the Q/DQ pair itself consistent so only R16 trips
        if n.op_type == "DequantizeLinear" and n.input[0] == "b_quantized":
            n.input[1] = scale_name
    assert status(model)["R16"] == "pass" and status(bad)["R16"] == "FAIL"


def test_warnings_do_not_fail(clean):
    bad = copy(clean)
    add = next(n for n in bad.graph.node if n.op_type == "Add")
    add.input[0] = "stem.act"  # residual input read in float: slower, not wrong
    s = status(bad)
    assert s["R11"] == "warn" and passed(lint(ir.from_proto(bad)))


def test_attention_products_in_float_warn_but_weighted_matmuls_must_be_quantized():
    """R8 is TensorRT's rule for weighted layers; Q·Kᵀ and P·V left in float only warn (R8b)."""
    from builders import attention_model

    seq = 8
    calib = {"hidden": np.random.default_rng(0).normal(size=(8, seq, 16)).astype(np.float32),
             "attention_mask": np.ones((8, seq), np.int64)}
    model = quantize(attention_model(seq=seq), calib, show_progress=False,
                     recipe=[{"quantize": {"exclude": ["scores/MatMul", "context/MatMul"]}}])
    assert status(model)["R8"] == "pass" and status(model)["R8b"] == "warn"
    assert status(quantize(attention_model(seq=seq), calib, show_progress=False, recipe=["quantize"]))["R8b"] == "pass"
    broken = copy(model)
    dense = next(n for n in broken.graph.node if n.name == "query/MatMul")
    dense.input[0] = "hidden"  # the weighted projection now reads the float input
    assert status(broken)["R8"] == "FAIL"
