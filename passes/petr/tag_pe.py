"""petr_pe: recognise a PETR position embedding and mark it in the graph (no rewrite).

Kind: exact (only node metadata changes). onnxq/petr_pe.py finds the PE (computed in the graph from
a camera-matrix input, LID or QFPE type, or given as a graph input) and the Add(memory, pe) nodes
feeding the cross-attention key projections; this pass records what it found in the pass summary
and tags those nodes (`onnxq.analysis.petr_pe`, shown by Netron). `pe_fold` and `qfpe` use the same helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from onnxq.analysis.petr_pe import find_pe, tag_site
from onnxq.pipeline.passes import GraphPass, Kind, PassContext


@dataclass(frozen=True)
class PetrPE(GraphPass):
    name: ClassVar[str] = "petr_pe"
    kind: ClassVar[Kind] = Kind.EXACT

    pe_input: str = ""  # the graph input the PE comes from, if the recognition is ambiguous

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        site = find_pe(model, self.pe_input or None)
        tag_site(site)
        ctx.log(site.describe())
        return site.summary()
