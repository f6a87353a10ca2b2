"""klt_rotate: MambaQuant's KLT-enhanced rotation R = K·H, from calibration statistics, folded into weights.

Kind: exact. The rotation is orthogonal (K orthogonal eigenvectors, H an orthogonal Hadamard matrix),
so it folds exactly like `rotate` (see rotate.py for the algebra of each site):

* residual stream (pre-norm RMSNorm models): K diagonalises C = E[x̂ᵀx̂], the second moment of the
  normalised stream as the linear layers read it (all norm outputs pooled, γ folded first), so x̂·K
  has uncorrelated channels whose variances are C's eigenvalues; H then spreads those unequal
  variances evenly over all channels (each output channel of x̂·K·H has variance mean(λ)) and
  flattens outliers. The same R rotates embeddings, writers (Wᵀ side) and readers.
* per-head V/O: K_g from the second moment of V's head-g channels, R_g = K_g·H per KV head.
* optionally an online rotation before the down projection with R = K·H from the down input.

Statistics are second moments of the tensors the model has when the pass runs, so after `rotate`
they are those of the rotated activations and the KLT composes with that rotation. They accumulate
in float64 batch by batch (d×d per site), never holding the calibration activations.
The stream rotation needs RMSNorm (a LayerNorm stream needs R·1 = 1, which K·H breaks): such
models, and post-norm ones, keep their stream unrotated here, with the reason in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer
from onnxq.passes.transformer.norm_folding import fold, linear_readers
from onnxq.passes.transformer.rotation import (
    head_problem,
    insert_online_rotation,
    klt,
    orthogonal,
    rotate_heads,
    rotate_stream,
    stream_problem,
)
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize
from onnxq.stats.observers import SecondMoments
from onnxq.stats.service import observe


@dataclass(frozen=True)
class KltRotate(GraphPass):
    name: ClassVar[str] = "klt_rotate"
    kind: ClassVar[Kind] = Kind.EXACT

    residual: bool = True
    heads: bool = True
    online_down: bool = False
    seed: int = 0

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        data = ctx.require_calibration(self.name)
        rng = np.random.default_rng(self.seed)
        graph, namer = model.graph, Namer(model.graph)
        s = st.analyse(model)
        summary: dict = {}
        stream_ok = False
        if self.residual:
            why = stream_problem(s)
            if why is None and any(n.kind != "rms" for n in s.stream.norms):
                why = "the stream's norms are LayerNorms: K·H does not fix the all-ones vector (use rotate)"
            if why:
                summary["residual"] = f"not rotated: {why}"
                ctx.log(f"klt_rotate: residual stream not rotated: {why}")
            else:
                for norm in s.stream.norms:  # statistics of x̂ as the readers will see it: fold γ/β first
                    if norm.has_affine or norm.scale_node is not None or norm.bias_node is not None:
                        fold(graph, namer, norm, linear_readers(s, norm)[0])
                stream_ok = True
        atts = [a for a in s.attentions if self.heads and head_problem(a) is None]
        mlps = list(s.mlps) if self.online_down else []
        names = sorted({*(n.output.name for n in (s.stream.norms if stream_ok else [])), *(a.v.output.name for a in atts),
                        *(m.down.input.name for m in mlps)})
        moments = second_moments(model, names, data, show_progress=ctx.show_progress)
        if stream_ok:
            c = sum(moments[n.output.name] for n in s.stream.norms)
            r = klt(c) @ orthogonal(s.stream.width, "hadamard", rng)
            rotate_stream(graph, namer, s, r, "_klt")
            summary["residual"] = f"rotated ({s.stream.width}, K·H)"
        for att in atts:
            c = moments[att.v.output.name]
            d = att.head_dim
            h = orthogonal(d, "hadamard", rng)
            rs = [klt(c[g * d:(g + 1) * d, g * d:(g + 1) * d]) @ h for g in range(att.num_kv_heads)]
            rotate_heads(graph, namer, att, rs, "_klt")
        summary["heads_rotated"] = len(atts)
        for mlp in mlps:
            r = klt(moments[mlp.down.input.name]) @ orthogonal(mlp.down.in_features, "hadamard", rng)
            insert_online_rotation(graph, namer, mlp.down, r, "klt")
        if mlps:
            summary["online_rotations"] = len(mlps)
        graph.sort()
        return summary


def second_moments(model: ir.Model, names: list[str], data, *, show_progress: bool = True) -> dict[str, np.ndarray]:
    """E[xᵀx] over the rows (last axis = channels) of each tensor, accumulated batch by batch."""
    moments = SecondMoments(names)
    observe(model, data, moments, desc="KLT statistics", show_progress=show_progress)
    return moments.result
