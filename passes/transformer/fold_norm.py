"""fold_norm: fold each norm's scale γ and shift β into the linear layers that read it.

Kind: exact. A norm writes y = γ ⊙ x̂ + β (x̂ = the normalised input) and every reader computes
y·W + b. Since (γ ⊙ x̂ + β)·W + b = x̂·(diag(γ)·W) + (β·W + b), each reader gets W ← diag(γ)·W and
b ← β·W + b (a bias Add is created if the reader has none), and the norm then writes x̂ alone: the
γ Mul / β Add of a decomposed norm are removed, a fused op gets γ = 1 and β = 0. The products are
computed in float64 and rounded once to float32.

Only norms whose readers are all linear layers qualify. A post-norm LayerNorm (BERT) also feeds the
residual Add, where γ/β are part of the stream itself: it is left alone and the summary says why.
A γ-free RMSNorm is what the residual rotation needs: RMSNorm(x·R) = RMSNorm(x)·R for orthogonal R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer
from onnxq.passes.transformer.norm_folding import fold, linear_readers
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize


@dataclass(frozen=True)
class FoldNorm(GraphPass):
    name: ClassVar[str] = "fold_norm"
    kind: ClassVar[Kind] = Kind.EXACT

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        s = st.analyse(model)
        namer = Namer(model.graph)
        folded, kept = 0, {}
        for norm in s.norms:
            if not norm.has_affine and norm.scale_node is None and norm.bias_node is None:
                continue
            readers, why = linear_readers(s, norm)
            if why:
                kept[norm.name] = why
                continue
            fold(model.graph, namer, norm, readers)
            folded += 1
        summary = {"folded": folded, "kept": len(kept)}
        if kept:
            reasons = sorted(set(kept.values()))
            summary["kept_because"] = reasons[:3]
            ctx.log(f"fold_norm: {len(kept)} norm(s) keep their γ/β: {reasons[0]}")
        return summary
