"""Biases ONNX Runtime cannot re-quantize, applied by an Add after their layer instead.

ONNX Runtime's WeightBiasQuantization graph optimizer rewrites the float bias b of a Conv,
ConvTranspose or Gemm whose input and weight come from DequantizeLinear as int32 steps of s_x·s_w,
round(b / (s_x·s_w)), without checking the range. Where that passes 2³¹ the cast wraps and the channel's
output is garbage: a channel with tiny weights does it, and FP8's scales (amax/448 on both sides) do it
12× sooner than INT8's. The optimizer leaves a bias added by a separate Add alone, so such a layer gets
one: the float result is the same up to the order of one addition, and TensorRT fuses the Add into the
layer as it fuses a bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, const_array, take_over_output

_LAYERS = ("Conv", "ConvTranspose", "Gemm")
# int32's range, with room for the float rounding of b / (s_x·s_w) in ONNX Runtime's own arithmetic
INT32_SAFE = float(2**31 - 2**10)


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
