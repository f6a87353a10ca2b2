"""Biases ONNX Runtime cannot re-quantize, applied by an Add after their layer instead.

ONNX Runtime's WeightBiasQuantization graph optimizer rewrites the float bias b of a Conv,
ConvTranspose or Gemm whose input and weight come from DequantizeLinear as int32 steps of s_x·s_w,
round(b / (s_x·s_w)), without checking the range. Where that passes 2³¹ the cast wraps and the channel's
output is garbage: a channel with tiny weights does it, and FP8's scales (amax/448 on both sides) do it
12× sooner than INT8's. The optimizer leaves a bias added by a separate Add alone, so such a layer gets
one: the float result is the same up to the order of one addition, and TensorRT fuses the Add into the
layer as it fuses a bias.

ONNX Runtime's CPU provider does not: a Conv whose bias is a separate Add stays a float Conv between a
DequantizeLinear and a QuantizeLinear. For that target, `widen_weight_scales` fits the bias instead: an
overflowing channel's weights are tiny next to its bias, so its weight step can grow to
|b| / (s_x·2³⁰) and its integers be re-rounded on the coarser grid. Each weight then moves by at most
half that step, and never by more than itself (a weight below half a step becomes 0), so the channel's
output moves by at most its weights' own contribution, which is what made the step tiny to begin with.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, const_array, swap_initializer, take_over_output

_LAYERS = ("Conv", "ConvTranspose", "Gemm")
# int32's range, with room for the float rounding of b / (s_x·s_w) in ONNX Runtime's own arithmetic
INT32_SAFE = float(2**31 - 2**10)
# where a widened step puts the bias: the int32 accumulator adds Σ x_q·w_q to it, so half the range is
# left for that sum (up to 2¹⁵ products of 255·127)
WIDENED_BIAS_STEPS = float(2**30)


def int32_bias_overflow(node: ir.Node) -> float | None:
    """max |b| / (s_x·s_w) over the channels of a layer ONNX Runtime would re-quantize the bias of, if that
    is past int32's range; None otherwise (nothing to re-quantize, or it fits)."""
    if node.op_type not in _LAYERS or len(node.inputs) < 3:
        return None
    bias = const_array(node.inputs[2])
    s_x, s_w = _dequantize_scale(node.inputs[0]), _dequantize_scale(node.inputs[1])
    if bias is None or bias.ndim != 1 or s_x is None or s_x.size != 1 or s_w is None:
        return None
    if s_w.size not in (1, bias.size) or not (np.all(s_w > 0) and np.all(s_x > 0)):
        return None  # a scale that is not positive is lint rule R2's to report
    steps = np.abs(bias.astype(np.float64)) / (float(s_x.reshape(())) * s_w.astype(np.float64).reshape(-1))
    worst = float(np.max(steps))
    return worst if worst >= INT32_SAFE else None


def detach_overflowing_biases(graph: ir.Graph) -> list[str]:
    """Move each bias int32_bias_overflow flags to an Add on the layer's output; returns the layers."""
    namer, moved = Namer(graph), []
    for node in list(graph):
        if int32_bias_overflow(node) is None:
            continue
        bias = node.inputs[2]
        array = const_array(bias)
        if node.op_type != "Gemm":  # channels on axis 1 of an N×C×spatial output
            array = array.reshape(-1, *[1] * (_rank(node.inputs[1]) - 2))
        elif "beta" in node.attributes:  # Gemm adds beta·C: the Add adds it instead
            array = (node.attributes.pop("beta").as_float() * array).astype(array.dtype)
        constant = add_initializer(graph, namer, f"{bias.name}_added", array)
        add = ir.node("Add", [node.outputs[0], constant], name=namer.fresh(f"{node.name}_bias"))
        add.outputs[0].name = namer.fresh(f"{node.outputs[0].name}_biased")
        add.outputs[0].dtype, add.outputs[0].shape = node.outputs[0].dtype or bias.dtype, node.outputs[0].shape
        add.metadata_props["onnxq.bias_moved"] = "bias of the layer before, added here: as an int32 bias it overflows"
        graph.insert_after(node, add)
        take_over_output(node.outputs[0], add.outputs[0], keep=add)
        node.resize_inputs(2)
        if not bias.uses() and bias.is_initializer() and not bias.is_graph_input():
            graph.initializers.pop(bias.name)
        moved.append(node.name)
    return moved


def widen_weight_scales(graph: ir.Graph) -> list[str]:
    """For each layer int32_bias_overflow flags whose weight has one integer scale per output channel,
    raise the overflowing channels' scales to what the bias needs and re-round their integers (new
    initializers: the old may be shared); returns the layers. Others are left for
    detach_overflowing_biases."""
    namer, widened = Namer(graph), []
    for node in list(graph):
        if int32_bias_overflow(node) is None or node.op_type == "Gemm":
            continue
        dq = node.inputs[1].producer()
        q, scale = const_array(dq.inputs[0]), const_array(dq.inputs[1])
        zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        bias = const_array(node.inputs[2]).astype(np.float64)
        if q is None or q.dtype.kind not in "iu" or scale is None or scale.size != bias.size or scale.size == 1 \
                or dq.attributes.get_int("axis", 1) != 0:
            continue
        s_x = float(_dequantize_scale(node.inputs[0]).reshape(()))
        needed = np.abs(bias) / (s_x * WIDENED_BIAS_STEPS)
        new_scale = np.maximum(scale.astype(np.float64), needed).astype(scale.dtype)
        zp = np.zeros_like(scale, dtype=np.float64) if zero is None else zero.astype(np.float64).reshape(-1)
        shape = (-1,) + (1,) * (q.ndim - 1)
        info = np.iinfo(q.dtype)
        real = (q.astype(np.float64) - zp.reshape(shape)) * scale.astype(np.float64).reshape(shape)
        requantized = np.clip(np.round(real / new_scale.astype(np.float64).reshape(shape)) + zp.reshape(shape),
                              info.min, info.max).astype(q.dtype)
        for index, array in ((0, requantized), (1, new_scale)):
            swap_initializer(graph, namer, dq, index, f"{dq.inputs[index].name}_widened", array)
        dq.metadata_props["onnxq.scale_widened"] = (
            f"{int(np.sum(new_scale > scale))} channel step(s) raised so the bias fits int32 (ORT fuses the layer)")
        widened.append(node.name)
    return widened


def _rank(weight: ir.Value) -> int:
    """Rank of a layer's weight: from its shape, or from the stored tensor its DequantizeLinear reads."""
    if weight.shape is not None:
        return len(weight.shape)
    return const_array(weight.producer().inputs[0]).ndim


def _dequantize_scale(value: ir.Value | None) -> np.ndarray | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    return const_array(producer.inputs[1])
