"""lift_constants: Constant nodes holding tensors become initializers.

Kind: exact (the same values, stored where every other pass looks for weights). Exported models such
as PP-OCR keep all their weights in Constant nodes; after this pass weights are initializers
whatever the exporter did, named after the Constant's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext


@dataclass(frozen=True)
class LiftConstants(GraphPass):
    name: ClassVar[str] = "lift_constants"
    kind: ClassVar[Kind] = Kind.EXACT

    min_elements: int = option(2, low=1)  # scalars stay Constant nodes: they are operator arguments, not weights

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        before = sum(1 for n in model.graph if n.op_type == "Constant")
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=self.min_elements)(model)
        after = sum(1 for n in model.graph if n.op_type == "Constant")
        return {"constants_lifted": before - after}
