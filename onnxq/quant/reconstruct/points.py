"""Where a block is quantized, and at which scales: the Q/DQ plan restricted to one block.

`ActivationPoint`: a per-tensor Q→DQ on an activation, seen by the listed readers (node name, input
index) only, as onnxq.quant.qdq inserts it. `WeightPoint`: a weight stored as integers of `fmt` with a
DequantizeLinear of `scale` in quantize_weight's layout (shape () per tensor, (C,) per channel along
`axis`, the weight's rank for blocks of `block_size` along the input axis). `out_axis` is the weight's
output-channel axis whatever the granularity (FlexRound's per-output factor lives there).
Points are keyed by tensor name, so a block and the graph it was cut from can be matched after copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import const_array
from onnxq.quant.qdq import (
    INT4_WEIGHT,
    INT8_WEIGHT,
    IntFormat,
    Plan,
    activation_format,
    activation_params,
    quantize_weight,
)
from onnxq.quant.qdq_rules import weight_axis
from onnxq.quant.reconstruct.blocks import Block


@dataclass(frozen=True)
class ActivationPoint:
    scale: float
    zero_point: int
    fmt: IntFormat
    readers: frozenset[tuple[str, int]]  # (node name, input index) that read the dequantized tensor


@dataclass(frozen=True, eq=False)
class WeightPoint:
    scale: np.ndarray
    axis: int | None
    fmt: IntFormat
    out_axis: int
    block_size: int = 0


@dataclass
class QuantPoints:
    activations: dict[str, ActivationPoint] = field(default_factory=dict)
    weights: dict[str, WeightPoint] = field(default_factory=dict)

    def reader_points(self) -> dict[tuple[str, int], tuple[str, ActivationPoint]]:
        """(node name, input index) → (tensor name, its point): where the converter fake-quantizes."""
        return {slot: (name, point) for name, point in self.activations.items() for slot in point.readers}


def weight_point(array: np.ndarray, out_axis: int, *, per_channel: bool = True, bits: int = 8,
                 calibrator: str = "max", block_size: int = 0) -> WeightPoint:
    """The point quantize_weight gives `array` under a scheme (the scales are round-to-nearest's)."""
    fmt = INT4_WEIGHT if bits == 4 else INT8_WEIGHT
    block = block_size if array.ndim == 2 else 0
    axis = out_axis if per_channel or block else None
    _, scale = quantize_weight(array, axis, fmt, calibrator, block)
    return WeightPoint(scale, axis, fmt, out_axis, block)


def points_from_plan(block: Block, plan: Plan, ranges: dict[str, tuple[float, float]], *, symmetric: bool = True,
                     activation_bits: int = 8, signed: bool = True, per_channel: bool = True, weight_bits: int = 8,
                     weight_calibrator: str = "max", block_size: int = 0) -> QuantPoints:
    """The plan's Q/DQ inside `block`: activations with a range in `ranges` ((lo, hi) by tensor name) get
    activation_params' scale; the block's learned weights get quantize_weight's scales."""
    names = {node.name for node in block.nodes}
    points = QuantPoints()
    fmt = activation_format(activation_bits, signed)
    for value, slots in plan.activations.items():
        readers = frozenset((node.name, index) for node, index in slots if node.name in names)
        source = plan.range_of.get(value, value).name
        if readers and source in ranges and value not in plan.skipped:
            scale, zero_point = activation_params(*ranges[source], fmt, symmetric)
            points.activations[value.name] = ActivationPoint(scale, zero_point, fmt, readers)
    planned = {weight.name for weight, _ in plan.weights}
    for slot in block.weights:
        if slot.value.name in planned and slot.value.name not in points.weights:
            points.weights[slot.value.name] = weight_point(
                const_array(slot.value), output_axis(slot.node, slot.index),
                per_channel=per_channel and weight_axis(slot.node, slot.index) is not None, bits=weight_bits,
                calibrator=weight_calibrator, block_size=block_size)
    return points


def output_axis(slot_node: ir.Node, index: int) -> int:
    """The output-channel axis of a learned weight (Conv 0, Gemm by transB, MatMul's last)."""
    axis = weight_axis(slot_node, index)
    if axis is None:  # a constant left operand of MatMul: its rows are the outputs
        return 0
    return axis
