"""scan_precision: keep each Mamba mixer's selective scan in float, or let quantize take it.

Kind: exact (it only tags nodes for the quantize step). The parallel scan's two activation×activation
MatMuls, C·Bᵀ and (L ⊙ C·Bᵀ)·(Δ ⊙ x), multiply decays and step sizes that span orders of magnitude
within one tensor, which is where MambaQuant finds the scan amplifying quantization error; with
`precision: float` quantize leaves them (and the Softplus/Exp/CumSum between, which are float anyway)
in float and records why, so a TensorRT build runs them in FP16/FP32 while every linear layer and
the conv1d run INT8. `precision: int8` leaves them to quantize's rule table (per-tensor INT8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.metadata import KEEP_FLOAT_KEY
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize

REASON = "Mamba selective scan kept in float (scan_precision): decays and step sizes span orders of magnitude"


@dataclass(frozen=True)
class ScanPrecision(GraphPass):
    name: ClassVar[str] = "scan_precision"
    kind: ClassVar[Kind] = Kind.EXACT

    precision: Literal["float", "int8"] = "float"

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        mixers = st.analyse(model).mamba_mixers
        if not mixers:
            ctx.log("scan_precision: no Mamba mixer recognised (run it before smooth_fused_rotate); nothing tagged")
        nodes = [n for m in mixers for n in m.scan_matmuls]
        for node in nodes:
            if self.precision == "float":
                node.metadata_props[KEEP_FLOAT_KEY] = REASON
            else:
                node.metadata_props.pop(KEEP_FLOAT_KEY, None)
        return {"mixers": len(mixers), "scan_matmuls": len(nodes), "precision": self.precision}
