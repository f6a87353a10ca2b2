"""smooth_fused_rotate: MambaQuant's smooth-fused rotation at each Mamba mixer's out_proj input.

Kind: exact. out_proj reads u = y ⊙ SiLU(z), z = h·W_z (in_z's output). For per-channel s > 0:

* in_z's output columns (and bias, if any) are divided by s, so it writes z' = z / s;
* S-SiLU: SiLU(z) / s = (z / s)·σ(z) = z'·σ(s ⊙ z'), so the Sigmoid reads Mul(z', s) and the gate
  now writes u / s;
* out_proj's weight rows are multiplied by s: (u / s)·(diag(s)·W) = u·W.

s is SmoothQuant's balance, s_j = max|u_j|^α / max_k |W_jk|^(1−α) (α = 0.5 by default, clamped to
≥ 1e-2 as MambaQuant does, a scale of 1 where u_j never moves), so the smoothed input's channels and the weight's rows share the
range. Then (`rotate`) an orthogonal R in front of out_proj: MatMul(u / s, R) and W ← Rᵀ·W. With
`basis: klt`, R = K·H: K the eigenvectors of the smoothed input's second moment E[(u/s)ᵀ(u/s)] =
S⁻¹·E[uᵀu]·S⁻¹ (computed from the unsmoothed moments, so one calibration pass serves both) and H a
Hadamard matrix, which first decorrelates the channels and then spreads their unequal variances
evenly; `basis: hadamard` uses H alone. R is an online rotation (one MatMul by a constant per mixer),
which is quantized with out_proj's input; nothing is approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer, add_initializer, mark_changed
from onnxq.ir.linear import set_bias, set_weight_io
from onnxq.passes.transformer.rotation import insert_online_rotation, klt, orthogonal
from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext, before_quantize
from onnxq.stats.observers import ChannelStatistics, SecondMoments
from onnxq.stats.service import observe

MIN_SCALE = 1e-2


@dataclass(frozen=True)
class SmoothFusedRotate(GraphPass):
    name: ClassVar[str] = "smooth_fused_rotate"
    kind: ClassVar[Kind] = Kind.EXACT

    alpha: float = 0.5
    smooth: bool = True
    rotate: bool = True
    basis: Literal["klt", "hadamard"] = "klt"
    seed: int = 0

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)
        if not 0 <= self.alpha <= 1:
            raise PassConditionError(f"smooth_fused_rotate: alpha must lie in [0, 1], not {self.alpha}")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        mixers = st.analyse(model).mamba_mixers
        if not mixers:
            ctx.log("smooth_fused_rotate: no Mamba mixer recognised; nothing to do")
            return {"mixers": 0}
        done = [m for m in mixers if m.ssilu_scale is not None]
        if done:
            ctx.log(f"smooth_fused_rotate: {len(done)} mixer(s) carry an S-SiLU already (the pass ran before); left alone")
        mixers = [m for m in mixers if m.ssilu_scale is None]
        names = [m.out_proj.input.name for m in mixers]
        amax, moments = ChannelStatistics(names, axis=-1, mean_square=False), SecondMoments(names)
        if mixers:
            observe(model, ctx.require_calibration(self.name), amax, moments, desc="smooth-fused rotation statistics",
                    show_progress=ctx.show_progress)
        graph, namer, rng = model.graph, Namer(model.graph), np.random.default_rng(self.seed)
        spreads = []
        for mixer in mixers:
            name = mixer.out_proj.input.name
            s = self._scales(amax.result[name].amax, mixer.out_proj.weight_io()) if self.smooth else None
            if s is not None:
                fuse_smoothing(graph, namer, mixer, s)
            if self.rotate:
                c = moments.result[name] if s is None else moments.result[name] / np.outer(s, s)
                width = c.shape[0]
                r = orthogonal(width, "hadamard", rng)
                r = klt(c) @ r if self.basis == "klt" else r
                insert_online_rotation(graph, namer, mixer.out_proj, r, f"sfr_{self.basis}")
            spreads.append(float(amax.result[name].amax.max() / max(np.median(amax.result[name].amax), 1e-12)))
        graph.sort()
        return {"mixers": len(mixers), "already_done": len(done), "smoothed": self.smooth, "rotation": self.basis if self.rotate else "none",
                "input_max_over_median_before": round(max(spreads, default=0.0), 1)}

    def _scales(self, act_amax: np.ndarray, w_io: np.ndarray) -> np.ndarray:
        w_amax = np.abs(w_io).max(axis=1).astype(np.float64)
        a = act_amax.astype(np.float64)
        s = np.where((a > 0) & (w_amax > 0), a ** self.alpha / np.maximum(w_amax, 1e-12) ** (1 - self.alpha), 1.0)
        return np.maximum(s, MIN_SCALE)


def fuse_smoothing(graph: ir.Graph, namer: Namer, mixer: st.MambaMixer, s: np.ndarray) -> None:
    """z' = z / s through in_z (weight columns and bias), σ(s ⊙ z') in the S-SiLU, out_proj rows × s (see
    the module docstring). The rescaled tensors get new names: a name never stands for two values."""
    set_weight_io(graph, namer, mixer.in_z, mixer.in_z.weight_io().astype(np.float64) / s)
    bias = mixer.in_z.bias_array()
    if bias is not None:
        set_bias(graph, namer, mixer.in_z, bias.astype(np.float64) / s)
    z = mixer.z_sigmoid.inputs[0]
    scale = add_initializer(graph, namer, f"{mixer.name}_ssilu_scale", s.astype(np.float32))
    mul = ir.node("Mul", [z, scale], name=namer.fresh(f"{mixer.name}_ssilu_Mul"))
    mul.outputs[0].name = namer.fresh(f"{z.name}_ssilu")
    mul.outputs[0].dtype, mul.outputs[0].shape = z.dtype, z.shape
    graph.insert_before(mixer.z_sigmoid, mul)
    mixer.z_sigmoid.replace_input_with(0, mul.outputs[0])
    set_weight_io(graph, namer, mixer.out_proj, mixer.out_proj.weight_io().astype(np.float64) * s[:, None])
    for value in (z, mixer.z_silu.outputs[0], mixer.gate.outputs[0]):
        mark_changed(value, "_smoothed", namer)
