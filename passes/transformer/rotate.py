"""rotate: QuaRot/SpinQuant-style orthogonal rotations folded into the weights.

Kind: exact. Row-vector convention y = x·W. For an orthogonal R (R·Rᵀ = I):

* Residual stream (pre-norm models). Every tensor of the stream is replaced by x·R: embedding
  tables T ← T·R (learned position tables added to it too), every writer (attention output and down
  projections; in a mixture of experts every expert's, since Σₑ gₑ·(yₑ·R) = (Σₑ gₑ·yₑ)·R for per-token
  gates gₑ) W ← W·R, b ← b·R. The norms
  that read the stream have had γ/β folded into their readers first (fold_norm), and
  RMSNorm(x·R) = x·R / rms(x·R) = RMSNorm(x)·R because ‖x·R‖ = ‖x‖; so every reader (Q/K/V,
  gate/up, MoE router, LM head) gets W ← Rᵀ·W and computes (x̂·R)·(Rᵀ·W) = x̂·W: its output is unchanged.
  LayerNorm also subtracts the mean: (x·R − mean(x·R)) = (x − mean(x))·R holds only when R fixes the
  all-ones vector (R·1 = 1), so pre-norm LayerNorm models get such a rotation (a random orthogonal
  matrix on the complement of 1, conjugated by the Householder reflection that maps e₁ to 1/√d).
  Post-norm models (BERT) are not rotated on the stream: their LayerNorm γ/β sit on the stream
  itself (the norm output is both the stream and a reader input), and γ⊙(x̂·R) + β ≠ (γ⊙x̂ + β)·R
  for per-channel γ; the summary gives the reason.
* Per-head V/O. For one R_h per KV head: V_g ← V_g·R_g (the V projection's columns of head g), and
  since softmax(QKᵀ)·(V_g·R_g) = (softmax(QKᵀ)·V_g)·R_g, the output projection's rows of every query
  head that reads KV head g get R_gᵀ·W_o. The reshapes/transposes between V and the attention
  MatMul keep the head dimension last, which the structure check verifies. Exact with GQA.
* Online rotation before the down projection: a MatMul with a constant H (Hadamard) is inserted on
  the down projection's input, and W_down ← Hᵀ·W_down, so x·H·Hᵀ·W = x·W. The new MatMul is
  quantized like any MatMul (INT8 weights represent ±1/√n exactly), but under the TensorRT rule
  that every MatMul input is quantized it also quantizes the un-rotated input first.

The matrices (randomised Hadamard, random orthogonal, 1-fixing) and the rewrites are in rotation.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer
from onnxq.passes.transformer.rotation import (
    head_problem,
    insert_online_rotation,
    ones_fixing_rotation,
    orthogonal,
    rotate_heads,
    rotate_stream,
    stream_problem,
)
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize


@dataclass(frozen=True)
class Rotate(GraphPass):
    name: ClassVar[str] = "rotate"
    kind: ClassVar[Kind] = Kind.EXACT

    residual: bool = True  # rotate the residual stream (pre-norm models)
    heads: bool = True  # per-head V/O rotation
    online_down: bool = False  # insert an online Hadamard MatMul before each down projection
    rotation: Literal["hadamard", "random"] = "hadamard"  # randomised Hadamard, or random orthogonal
    seed: int = 0


    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        rng = np.random.default_rng(self.seed)
        s = st.analyse(model)
        namer = Namer(model.graph)
        graph = model.graph
        summary: dict = {}
        if self.residual:
            why = stream_problem(s)
            if why:
                summary["residual"] = f"not rotated: {why}"
                ctx.log(f"rotate: residual stream not rotated: {why}")
            else:
                width = s.stream.width
                layer = any(n.kind == "layer" for n in s.stream.norms)
                r = ones_fixing_rotation(width, rng) if layer else orthogonal(width, self.rotation, rng)
                rotate_stream(graph, namer, s, r, "_rotated")
                summary["residual"] = f"rotated ({width}, {'1-fixing ' if layer else ''}{self.rotation})"
        if self.heads:
            done, skipped = 0, []
            for att in s.attentions:
                why = head_problem(att)
                if why:
                    skipped.append(why)
                    continue
                r = orthogonal(att.head_dim, self.rotation, rng)
                rotate_heads(graph, namer, att, [r] * att.num_kv_heads, "_rotated")
                done += 1
            summary["heads_rotated"] = done
            if skipped:
                summary["heads_skipped"] = sorted(set(skipped))[:3]
        if self.online_down:
            done = 0
            for mlp in s.mlps:
                r = orthogonal(mlp.down.in_features, self.rotation, rng)
                insert_online_rotation(graph, namer, mlp.down, r, "hadamard")
                done += 1
            summary["online_rotations"] = done
        graph.sort()
        return summary
