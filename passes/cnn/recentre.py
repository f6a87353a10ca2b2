"""recentre: non-negative activations use the whole symmetric INT8 grid.

Kind: approximate, never coarser than what `quantize` wrote. TensorRT's INT8 activations are
symmetric (zero point 0), so a ReLU output quantized over [-T, T] uses codes 0..127 only: half the
grid is spent on values that never occur. For x ≥ 0 whose quantized readers are all linear layers,
with the quantizer's scale s (range T = 127·s) and c = T/2:

    x' = x - c,   quantized at scale s/2   (codes -127..127 cover [-c, c], i.e. x in [0, T])
    y  = Ŵ·x + b = Ŵ·x' + (b + c·Ŵ·1)       (the readers' biases absorb the shift)

Every old grid point k·s is the new point (2k - 127)·s/2 + c and the clip range is the same, so no
value rounds worse and the bulk rounds to half the step; zero lands exactly on code -127. The bias
uses the dequantized weights the runtime multiplies, so the shift adds no error of its own. Where
`quantize` bias-corrected a reader for the old grid's mean rounding error, the change in that mean
(measured on the calibration data) goes into the bias as well, so the correction stays valid.
Readers must be MatMul (with or without a constant bias Add), Gemm, or Conv without padding: zero
padding of x' would stand for x = c. A tensor with any other reader is left alone.

Run it after `quantize`: it reads the scales quantize chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, attr, const_array, is_const, replace_initializer
from onnxq.ir.linear import Linear, dequantized_weight, replace_bias
from onnxq.metadata import CORRECTED_KEY
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, after_quantize
from onnxq.quant.bias_range import detach_overflowing_biases
from onnxq.stats.service import observe


@dataclass(frozen=True)
class Recentre(GraphPass):
    name: ClassVar[str] = "recentre"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    def requires(self, model: ir.Model) -> None:
        after_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        sites, skipped = [], {}
        for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
            if not _non_negative(q.inputs[0]) or not _symmetric_int8(q):
                continue
            readers, problem = _readers(q)
            if problem:
                skipped[q.inputs[0].name] = problem
            else:
                sites.append((q, readers))
        shifts = (_mean_rounding_change(model, sites, ctx.require_calibration(self.name), ctx.show_progress)
                  if sites else {})
        for q, readers in sites:
            recentre(graph, namer, q, readers, shifts)
        graph.sort()
        moved = detach_overflowing_biases(graph)  # half the step doubles b / (s_x·s_w): check it again
        return {"recentred": len(sites), "left_alone": skipped, **({"biases_moved_to_add": len(moved)} if moved else {})}


def recentre(graph: ir.Graph, namer: Namer, q: ir.Node, readers: list[Linear], shifts: dict) -> None:
    """Quantize q's input shifted down by half its range at half the scale; readers' biases absorb the
    shift and the change in mean rounding error (`shifts`, per input channel)."""
    scale_array = const_array(q.inputs[1])
    scale, float_type = float(scale_array), scale_array.dtype  # FP16 in an FP16 model
    c = np.asarray(127 * scale / 2, dtype=float_type)
    x = q.inputs[0]
    sub = ir.node("Sub", [x, add_initializer(graph, namer, f"{x.name}_centre", c)],
                  name=namer.fresh(f"{x.name}_recentre"))
    sub.outputs[0].name, sub.outputs[0].dtype, sub.outputs[0].shape = namer.fresh(f"{x.name}_recentred"), x.dtype, x.shape
    graph.insert_before(q, sub)
    q.replace_input_with(0, sub.outputs[0])
    half = add_initializer(graph, namer, f"{x.name}_recentred_scale", np.asarray(scale / 2, dtype=float_type))
    for node in [q, *(dq for dq, _ in q.outputs[0].uses())]:
        node.replace_input_with(1, half)
    for r in readers:
        delta = float(c) * _weighted_channels(r, np.ones(_in_channels(r)))
        if CORRECTED_KEY in r.node.metadata_props:
            delta -= _weighted_channels(r, shifts[(x.name, _channel_axis(r.node))])
        _add_to_bias(graph, namer, r, delta)


def _mean_rounding_change(model: ir.Model, sites, data, show_progress: bool) -> dict[tuple[str, int], np.ndarray]:
    """Per input channel, the calibration mean of (new grid's rounding) - (old grid's rounding) of each
    recentred tensor read by a bias-corrected layer. `quantize`'s bias correction compensated the old
    grid's mean error there; moving this difference into the bias keeps that correction valid on the
    new grid. Layers
    quantize did not correct keep only the exact shift: their new grid is the less biased one."""
    axes = {(q.inputs[0].name, _channel_axis(r.node)): float(const_array(q.inputs[1]))
            for q, readers in sites for r in readers if CORRECTED_KEY in r.node.metadata_props}
    if not axes:
        return {}
    change = RoundingChange(axes)
    observe(model, data, change, desc="recentre statistics", show_progress=show_progress)
    return change.result


class RoundingChange:
    """Per (tensor, channel axis): the per-channel mean over every position of
    (rounding on the recentred grid) − (rounding on the old grid), for the scale in `axes`."""

    def __init__(self, axes: dict[tuple[str, int], float]):
        self.axes = axes
        self.names = sorted({name for name, _ in axes})
        self._sums: dict[tuple[str, int], np.ndarray] = {}
        self._counts: dict[tuple[str, int], int] = {}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for (name, axis), s in self.axes.items():
            x = values[name].astype(np.float64)
            c = 127 * s / 2
            old = np.clip(np.round(x / s), -128, 127) * s
            new = np.clip(np.round((x - c) / (s / 2)), -128, 127) * (s / 2) + c
            diff = np.moveaxis(new - old, axis, 0).reshape(x.shape[axis], -1)
            self._sums[(name, axis)] = self._sums.get((name, axis), 0.0) + diff.sum(axis=1)
            self._counts[(name, axis)] = self._counts.get((name, axis), 0) + diff.shape[1]

    @property
    def result(self) -> dict[tuple[str, int], np.ndarray]:
        return {key: self._sums[key] / self._counts[key] for key in self._sums}


def _channel_axis(node: ir.Node) -> int:
    return 1 if node.op_type == "Conv" else -1


def _in_channels(r: Linear) -> int:
    w = dequantized_weight(r.weight)
    if r.node.op_type == "Conv":
        return w.shape[1] * attr(r.node, "group", 1)
    return w.shape[0 if r.node.op_type != "Gemm" or not attr(r.node, "transB", 0) else 1]


def _weighted_channels(r: Linear, per_channel: np.ndarray) -> np.ndarray:
    """Ŵ applied to a per-input-channel constant: what the layer adds per output channel (Ŵ·1 for ones)."""
    w, node = dequantized_weight(r.weight), r.node
    if node.op_type == "Conv":
        groups = attr(node, "group", 1)
        per_group = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # [out, in/group]
        inputs = per_channel.reshape(groups, -1)[np.arange(w.shape[0]) // (w.shape[0] // groups)]
        return (per_group * inputs).sum(axis=1)
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w @ per_channel
    return per_channel @ w


def _non_negative(x: ir.Value) -> bool:
    """x comes from Relu, from Clip/Max with a lower bound ≥ 0, or from Min(≥ 0 input, ≥ 0 bound): ReLU6
    and the per-channel Max → Min bounds equalize writes for it."""
    node = x.producer()
    if node is None or not node.inputs:
        return False
    if node.op_type == "Relu":
        return True
    bound = const_array(node.inputs[1]) if node.op_type in ("Clip", "Max", "Min") and len(node.inputs) > 1 else None
    if bound is None or float(np.min(bound)) < 0:
        return False
    return node.op_type != "Min" or _non_negative(node.inputs[0])


def _symmetric_int8(q: ir.Node) -> bool:
    scale = const_array(q.inputs[1])
    zero = const_array(q.inputs[2]) if len(q.inputs) > 2 else None
    return (scale is not None and scale.size == 1 and zero is not None and zero.dtype == np.int8
            and not zero.any())


def _readers(q: ir.Node) -> tuple[list[Linear], str]:
    """The linear layers reading q's dequantized outputs, or why the tensor is left alone."""
    readers = []
    for dq, _ in q.outputs[0].uses():
        if dq.op_type != "DequantizeLinear" or dq.outputs[0].is_graph_output():
            return [], f"read by {dq.op_type}"
        for node, index in dq.outputs[0].uses():
            w = dequantized_weight(node.inputs[1]) if index == 0 and node.op_type in ("MatMul", "Gemm", "Conv") else None
            if w is None or (node.op_type != "Conv" and w.ndim != 2):
                return [], f"read by {node.op_type} (input {index}), not a linear layer with a constant weight"
            if node.op_type == "Gemm" and attr(node, "transA", 0):
                return [], "read by a Gemm with transA"
            if node.op_type == "Conv" and (any(attr(node, "pads", [0])) or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
                return [], "read by a padded Conv (zero padding would stand for x = centre)"
            readers.append(_as_linear(node))
    return readers, ""


def _as_linear(node: ir.Node) -> Linear:
    """A reader as a linear layer with its constant bias: Conv/Gemm input 2, or the constant of the Add
    that alone reads a MatMul (channels last, so any bias shape ending in them takes a per-channel delta)."""
    lin = Linear(node, node.inputs[1], transposed=node.op_type == "Gemm" and bool(attr(node, "transB", 0)))
    if node.op_type in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2] is not None and is_const(node.inputs[2]):
            lin.bias = node.inputs[2]
        return lin
    channels = dequantized_weight(node.inputs[1]).shape[1]
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0][0].op_type == "Add" and not node.outputs[0].is_graph_output():
        add, slot = uses[0]
        bias = const_array(add.inputs[1 - slot])
        if bias is not None and (bias.ndim == 0 or bias.shape[-1] == channels):
            lin.bias, lin.bias_node = add.inputs[1 - slot], add
    return lin


def _add_to_bias(graph: ir.Graph, namer: Namer, lin: Linear, delta: np.ndarray) -> None:
    """Add `delta` (one value per output channel) to the layer's constant bias, creating one if needed:
    edited in place when nothing else reads it, else a new initializer `<layer>_bias_recentred`."""
    name = f"{lin.node.name}_bias_recentred"
    out_type = lin.node.outputs[0].dtype  # an FP16 model keeps FP16 biases
    dtype = out_type.numpy() if out_type is not None else np.float32
    if lin.bias is not None:
        old = const_array(lin.bias)
        new = (old.astype(np.float64) + delta).astype(old.dtype)
        if len(lin.bias.uses()) == 1 and lin.bias.is_initializer():
            replace_initializer(lin.bias, new)
        else:
            replace_bias(graph, namer, lin, new, name, dtype=old.dtype)
        return
    replace_bias(graph, namer, lin, delta, name, dtype=dtype)
