"""fold_batchnorm: BatchNormalization after Conv, ConvTranspose or Gemm folds into its weights.

Kind: exact. With y = W·x + b followed by BN, γ·(y − μ)/√(σ² + ε) + β equals
W'·x + b' with W' = W·γ/√(σ² + ε) per output channel and b' = (b − μ)·γ/√(σ² + ε) + β.
The rewrite rules are onnxscript's (rewriter/rules/common/_fuse_batchnorm.py); this pass runs them
and gives the fused layer back the names of the layer and tensor it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

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
        # remember which layer fed each BN, to give the fused layer that layer's name
        layer_name = {bn.outputs[0].name: bn.inputs[0].producer().name for bn in _foldable(model.graph)}
        rewriter.rewrite(model, pattern_rewrite_rules=_RULES)
        for node in model.graph:
            if node.op_type in _FUSABLE and node.outputs[0].name in layer_name:
                node.name = layer_name[node.outputs[0].name]
        return {"batchnorms_folded": len(layer_name) - len(_foldable(model.graph)),
                "batchnorms_left": sum(1 for n in model.graph if n.op_type == "BatchNormalization")}


def _foldable(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "BatchNormalization" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type in _FUSABLE]
