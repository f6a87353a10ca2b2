"""Fold a learned block back into the graph: integer weights and a DequantizeLinear, as quantize writes.

For each quantized weight of the block the quantizer's final integers and scale are stored through
onnxq.quant.qdq.insert_weight_dq, read by the block's readers of that weight (a reader outside the
block keeps the float tensor). AdaRound stores ⌊W/s⌋ + 1[h ≥ 0.5] at the given s; FlexRound stores
round(W / (s₁·S₂·s₃·s₄)) at the learned s₁, its other factors living on only in which integer each
weight became. Either way the DequantizeLinear's scale has the point's layout (per tensor, per channel
or per block), which is checked, so the deployed format is the scheme's and no new op appears.
`insert_activation_points` places the block's activation Q/DQ pairs the same way, at the points' scales.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import Namer
from onnxq.quant.qdq import insert_activation_qdq, insert_weight_dq
from onnxq.quant.reconstruct.blocks import Block
from onnxq.quant.reconstruct.points import QuantPoints, WeightPoint
from onnxq.quant.reconstruct.torch_block import BlockModule


def learned_weights(module: BlockModule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Weight name → (integers in the format's dtype, scale in the point's layout), from the module's
    quantizers as they stand."""
    import torch

    found = {}
    with torch.no_grad():
        for name in module.quantized_weights:
            quantizer = module.quantizer(name)
            point = quantizer.point
            q = quantizer.integers(module.weight(name)).cpu().numpy()
            scale = quantizer.scale().cpu().numpy().astype(np.float32)
            _check_layout(name, point, q, scale)
            found[name] = (q.astype(np.int32).astype(point.fmt.numpy), scale)
    return found


def _check_layout(name: str, point: WeightPoint, q: np.ndarray, scale: np.ndarray) -> None:
    if scale.shape != np.shape(point.scale):
        raise OnnxqError(f"weight '{name}': learned scale has shape {scale.shape}, "
                         f"the scheme's is {np.shape(point.scale)}")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise OnnxqError(f"weight '{name}': learned scale is not positive and finite")
    if q.min() < point.fmt.qmin or q.max() > point.fmt.qmax:
        raise OnnxqError(f"weight '{name}': integers outside [{point.fmt.qmin}, {point.fmt.qmax}]")


def fold_back(graph: ir.Graph, block: Block, module: BlockModule, namer: Namer | None = None) -> list[str]:
    """Replace each quantized weight the block's nodes read by its learned integers and DequantizeLinear;
    returns the weight names written. `block` must have been cut from `graph` (same node objects)."""
    namer = namer or Namer(graph)
    written = []
    for name, (q, scale) in learned_weights(module).items():
        point = module.points.weights[name]
        slots = [(slot.node, slot.index) for slot in block.weights if slot.value.name == name]
        weight = slots[0][0].inputs[slots[0][1]]
        insert_weight_dq(graph, namer, weight, slots, q, scale, point.axis, point.fmt, point.block_size)
        written.append(name)
    graph.sort()
    return written


def insert_activation_points(graph: ir.Graph, points: QuantPoints, namer: Namer | None = None) -> int:
    """Q→DQ pairs at the points' activations, read by the points' readers; returns how many."""
    namer = namer or Namer(graph)
    nodes = {node.name: node for node in graph}
    values = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
    for name, point in points.activations.items():
        if name not in values:
            raise OnnxqError(f"activation '{name}' is not a tensor of the graph")
        slots = [(nodes[node_name], index) for node_name, index in sorted(point.readers)]
        insert_activation_qdq(graph, namer, values[name], slots, point.scale, point.zero_point, point.fmt)
    graph.sort()
    return len(points.activations)
