"""fold_batchnorm: BatchNormalization after Conv, ConvTranspose or Gemm folds into its weights.

Kind: exact. With y = W·x + b followed by BN, γ·(y − μ)/√(σ² + ε) + β equals
W'·x + b' with W' = W·γ/√(σ² + ε) per output channel and b' = (b − μ)·γ/√(σ² + ε) + β.
Exporters that write a layer's bias as an Add of its own (Paddle's, for ConvTranspose) put that Add
between the layer and its BN; a per-channel constant c there goes into the layer's bias first
(W·x + b + c = W·x + b'), so the BN folds as well.
The rewrite rules are onnxscript's (rewriter/rules/common/_fuse_batchnorm.py); this pass runs them
and gives the fused layer back the names of the layer and tensor it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxq.ir.conv import CHANNEL_LAYERS, output_channels, per_channel
from onnxq.ir.graph import Namer, const_array, is_const, only_consumer, swap_initializer
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize

_RULES = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
_FUSABLE = {"Conv", "ConvTranspose", "Gemm"}


@dataclass(frozen=True)
class FoldBatchNorm(GraphPass):
    name: ClassVar[str] = "fold_batchnorm"
    kind: ClassVar[Kind] = Kind.EXACT

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        absorbed = _absorb_bias_adds(model.graph)
        # remember which layer fed each BN, to give the fused layer that layer's name
        layer_name = {bn.outputs[0].name: bn.inputs[0].producer().name for bn in _foldable(model.graph)}
        rewriter.rewrite(model, pattern_rewrite_rules=_RULES)
        for node in model.graph:
            if node.op_type in _FUSABLE and node.outputs[0].name in layer_name:
                node.name = layer_name[node.outputs[0].name]
        return {**({"bias_adds_absorbed": absorbed} if absorbed else {}),
                "batchnorms_folded": len(layer_name) - len(_foldable(model.graph)),
                "batchnorms_left": sum(1 for n in model.graph if n.op_type == "BatchNormalization")}


def _foldable(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "BatchNormalization" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type in _FUSABLE]


def _absorb_bias_adds(graph: ir.Graph) -> int:
    """Conv/ConvTranspose → Add(per-channel constant) → BN becomes Conv/ConvTranspose (bias b + c) → BN."""
    absorbed, namer = 0, Namer(graph)
    for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
        add = bn.inputs[0].producer()
        match = _bias_add(add) if add is not None and only_consumer(add.outputs[0]) is bn else None
        if match is None:
            continue
        layer, c, constant = match
        if len(layer.inputs) < 3:
            layer.resize_inputs(3)
        dtype = const_array(layer.inputs[1]).dtype  # the layer's float type (FP16 models stay FP16)
        bias = const_array(layer.inputs[2]) if layer.inputs[2] is not None else np.zeros_like(c)
        swap_initializer(graph, namer, layer, 2, f"{layer.name}_bias", (bias.astype(np.float32) + c).astype(dtype))
        bn.replace_input_with(0, layer.outputs[0])
        graph.remove(add, safe=True)
        if not constant.uses() and constant.is_initializer() and not constant.is_graph_input():
            graph.initializers.pop(constant.name)
        absorbed += 1
    return absorbed


def _bias_add(add: ir.Node) -> tuple[ir.Node, np.ndarray, ir.Value] | None:
    """(layer, c, the constant's value) when `add` adds a per-output-channel constant c to a
    constant-weight Conv or ConvTranspose that only it reads, and the layer's bias (if any) is constant."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for data, constant in (add.inputs, reversed(add.inputs)):
        layer, c = data.producer() if data is not None else None, const_array(constant)
        if layer is None or c is None or layer.op_type not in CHANNEL_LAYERS or only_consumer(data) is not add:
            continue
        weight = const_array(layer.inputs[1])
        has_bias = len(layer.inputs) > 2 and layer.inputs[2] is not None
        if weight is None or (has_bias and not is_const(layer.inputs[2])) or data.shape is None:
            continue
        c = per_channel(c, len(data.shape), output_channels(layer, weight))
        if c is not None:
            return layer, c, constant
    return None
