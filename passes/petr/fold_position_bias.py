"""fold_position_bias: a constant positional term added to a linear layer's input moves into its bias.

Kind: exact. With x an activation and P a constant that varies over positions (a learned query
position embedding, DETR/PETR's `tgt + query_pos`), a linear layer reading the sum computes

    (x + P)·W + b = x·W + (P·W + b) = x·W + C,   C = P·W + b   (one constant per reader)

so each MatMul reads x directly and its bias becomes C. A per-tensor INT8 quantizer then sees only
x; P reaches the output through the float bias instead of through the input's INT8 steps, where
its rounding would blur every query's positional identity. Readers of the sum that are not linear layers (a residual Add) keep the sum.

Only position-dependent constants fold (P must vary along an axis other than the last): a per-channel
bias vector feeding the next layer is a layer's own bias and stays where TensorRT fuses it. C is
computed in float64; the only change is float32 rounding of the reassociated sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.ir.graph import Namer, const_array, is_const
from onnxq.ir.linear import Linear, fold_input_addend
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize


@dataclass(frozen=True)
class FoldPositionBias(GraphPass):
    name: ClassVar[str] = "fold_position_bias"
    kind: ClassVar[Kind] = Kind.EXACT

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        adds = folded = 0
        for add in list(graph):
            match = _positional_add(add)
            if match is None:
                continue
            x, position = match
            linears = [lin for node, index in list(add.outputs[0].uses()) if (lin := _linear(node, index)) is not None]
            for lin in linears:
                fold_input_addend(graph, namer, lin, x, position)
            adds += bool(linears)
            folded += len(linears)
        RemoveUnusedNodesPass()(model)  # sums that only linear layers read are dead now
        return {"position_adds": adds, "linears_folded": folded}


def _positional_add(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(x, P) for Add(x, P) with P a constant that varies along an axis other than the last."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        position, x = const_array(node.inputs[index]), node.inputs[1 - index]
        if position is not None and not is_const(x) and position.ndim >= 2 \
                and any(size > 1 for size in position.shape[:-1]):
            return x, position
    return None


def _linear(node: ir.Node, index: int) -> Linear | None:
    """`node` as a linear layer reading the sum as its input 0 (constant 2-D weight, optional bias)."""
    weight = const_array(node.inputs[1]) if node.op_type == "MatMul" and index == 0 else None
    if weight is None or weight.ndim != 2:
        return None
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0][0].op_type == "Add" and not node.outputs[0].is_graph_output():
        add, slot = uses[0]
        bias = const_array(add.inputs[1 - slot])
        if bias is not None and bias.ndim == 1 and len(add.inputs[1 - slot].uses()) == 1:
            return Linear(node, node.inputs[1], add.inputs[1 - slot], add)
    return Linear(node, node.inputs[1])
