"""fold_constants: evaluate every subgraph whose inputs are all constant and store the result.

Kind: exact (the folded values are what the graph would compute; evaluation uses ONNX's reference
implementation in float32, the same arithmetic the runtime does). Weight transposes, reshapes and
scalings that exporters leave in the graph become plain initializers, so later passes see weights.
Unused nodes are removed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnxscript import optimizer

from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext


@dataclass(frozen=True)
class FoldConstants(GraphPass):
    name: ClassVar[str] = "fold_constants"
    kind: ClassVar[Kind] = Kind.EXACT

    max_input_elements: int = option(1 << 26, low=0)  # fold through weights of any realistic size
    max_output_elements: int = option(1 << 26, low=0)  # but never materialise an enormous tensor

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        before = model.graph.num_nodes()
        optimizer.fold_constants(model, input_size_limit=self.max_input_elements,
                                 output_size_limit=self.max_output_elements)
        optimizer.remove_unused_nodes(model)
        return {"nodes_removed": before - model.graph.num_nodes()}
