"""smooth: SmoothQuant-style per-channel scales moved from activations into weights, α searched per site.

Kind: exact. For a quantized activation X read by linear layers y = X·W, and a positive vector s,
X·W = (X·diag(1/s))·(diag(s)·W): the activation is divided by s channel-wise and the readers' rows
multiplied by s. The division is folded into whatever writes X, so no op is added where avoidable:

* norm → readers: γ ← γ/s and β ← β/s (a fused norm's scale/bias inputs, or the decomposed γ Mul /
  β Add; a norm without γ gets a Mul by 1/s). When the norm output also feeds something other than
  linear layers (post-norm BERT: the residual Add), the linear readers get their own copy of the
  norm's affine part (a second LayerNormalization with γ/s, β/s), so the residual keeps γ⊙x̂ + β.
* V → O: V's output columns (and bias) of KV head g, channel j are divided by s_{g,j}; since
  softmax(QKᵀ)·(V·diag(1/s)) = (softmax(QKᵀ)·V)·diag(1/s) per head, the output projection's rows of
  every query head reading KV head g are multiplied by s_{g,·} (exact with GQA).
* inside the MLP (activation-activation smoothing, the FSBR SwiGLU case): the down projection's input
  is a = act(gate)·up (SwiGLU/GeGLU) or act(up). For the gated forms, a/s = act(gate)·(up/s): the up
  projection's columns are divided by s. For ReLU, ReLU(x/s) = ReLU(x)/s for s > 0. For the Erf form
  of GELU, GELU(x)/s = (x/s)·½(1 + erf((x/s)·s/√2)): the up columns are divided by s and the √2
  divisor inside erf becomes the per-channel √2/s (S-GELU, as MambaQuant's S-SiLU). Other
  activations get an explicit Mul by 1/s before the down projection. The down rows get ×s.

Sites whose readers' inputs rotate has rotated (node metadata `onnxq.input_rotated`) are left alone
by default (skip_rotated): the rotation has already spread their outlier channels.

α is searched per site on calibration data: s_j = max|X_j|^α / max_k|W_jk|^(1−α) for α in a grid
(and s = 1), choosing the one whose simulated quantized output error Σ_readers ‖Q(X/s)·Q(diag(s)W) −
X·W‖² / ‖X·W‖² is smallest, with per-tensor activation scales from the streamed per-channel maxima
and the weight format of the recipe (per-channel or per-tensor, INT8 or INT4, blocked). Where 1/s
lands in a linear layer's weight columns (V for V → O, up for the MLP), that layer's relative weight
error in its original units is added: with per-tensor weights one column grown by a tiny s would
set the whole tensor's scale (a ReLU MLP's dead units, with no activation to smooth, would otherwise
get huge weight columns). Channels never non-zero keep s = 1. Statistics
stream batch by batch (per-channel maxima plus a fixed-size row sample per site), so memory holds
one batch of activations and the samples, never the whole calibration set's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import (
    Namer,
    add_initializer,
    const_array,
    insert_elementwise,
    mark_changed,
    private_weight,
    replace_initializer,
)
from onnxq.ir.linear import set_bias, set_weight_io
from onnxq.metadata import INPUT_ROTATED_KEY
from onnxq.passes.transformer.rotation import head_problem
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize
from onnxq.progress import progress
from onnxq.quant.scheme import QuantScheme
from onnxq.stats.samples import channel_max_and_rows

SITES = ("norm", "vo", "mlp")


@dataclass(frozen=True)
class Smooth(GraphPass):
    name: ClassVar[str] = "smooth"
    kind: ClassVar[Kind] = Kind.EXACT

    sites: list[str] = option(list(SITES), choices=SITES)
    alpha: float | None = option(None, low=0.0, high=1.0)  # fixed α; None searches α per site
    alphas: int = option(11, low=2)  # grid size of the search over [0, 1]
    sample_rows: int = option(512, low=1)  # activation rows kept per site for the search
    max_columns: int = option(4096, low=1)  # readers wider than this (LM head) are scored on a column sample
    max_scale: float = option(1e4, low=1.0)
    seed: int = 0
    # Inputs that rotate has rotated are left alone: rotation already spread their outlier channels,
    # and scales on top move magnitude back into the weights.
    skip_rotated: bool = True


    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        s = st.analyse(model)
        graph, namer = model.graph, Namer(model.graph)
        sites = find_sites(s, self.sites)
        rotated = [site for site in sites if self.skip_rotated and _rotated(site)]
        sites = [site for site in sites if site not in rotated]
        if not sites:
            return {"smoothed": 0, "left_rotated": len(rotated)}
        names = sorted({site.activation.name for site in sites})
        stats = channel_max_and_rows(model, names, ctx.require_calibration(self.name), self.sample_rows, self.seed,
                        show_progress=ctx.show_progress)
        rng = np.random.default_rng(self.seed)
        chosen: dict[str, list[float]] = {}
        done = 0
        for site in progress(sites, desc="smooth: alpha search", unit="site", disable=not ctx.show_progress):
            amax, rows = stats.amax[site.activation.name], stats.rows(site.activation.name)
            scales, alpha = self.choose(site, amax, rows, rng, ctx.scheme)
            if scales is None:
                chosen.setdefault(site.kind, []).append(-1.0)
                continue
            site.apply(graph, namer, scales)
            chosen.setdefault(site.kind, []).append(alpha)
            done += 1
        graph.sort()
        summary = {"smoothed": done, "sites": len(sites), "left_rotated": len(rotated)}
        for kind, alphas in chosen.items():
            used = [a for a in alphas if a >= 0]
            summary[f"{kind}_alpha_mean"] = round(float(np.mean(used)), 2) if used else None
            summary[f"{kind}_left_alone"] = sum(a < 0 for a in alphas)
        return summary

    # --- α search ---------------------------------------------------------------------------------

    def choose(self, site: Site, amax: np.ndarray, rows: np.ndarray, rng,
               scheme: QuantScheme) -> tuple[np.ndarray | None, float]:
        """(scales in the site's channel layout, α) with the least simulated error under `scheme` (the
        format the quantize step will store); (None, -1) if s = 1 wins."""
        weights = [lin.weight_io().astype(np.float32) for lin in site.readers]
        weights = [w if w.shape[1] <= self.max_columns else w[:, np.sort(rng.choice(w.shape[1], self.max_columns, replace=False))]
                   for w in weights]
        x = rows.astype(np.float32)
        refs = [x @ w for w in weights]
        energies = [max(float(np.sum(r.astype(np.float64) ** 2)), 1e-30) for r in refs]
        a = site.group_max(np.maximum(amax, 1e-8))  # per smoothing channel
        dead = a <= 1e-8
        wmax = site.group_max(np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-8))
        writer = site.writer()
        w_writer = writer.weight_io().astype(np.float32) if writer is not None else None

        def error(scale_channels: np.ndarray) -> float:
            per_act = site.expand(scale_channels)
            act_amax = float(np.max(amax / per_act))
            xq = _fake_quant(x / per_act, act_amax, scheme.activation_bits)
            total = 0.0
            for w, ref, energy in zip(weights, refs, energies):
                wq = _quant_weight(per_act[:, None] * w, scheme)
                total += float(np.sum((xq @ wq - ref).astype(np.float64) ** 2)) / energy
            if w_writer is not None:
                # the writer's output columns carry 1/s: with per-tensor weights a wide spread of s
                # leaves its small columns a few INT8 steps (PETR's ReLU MLPs lost all accuracy)
                total += _relative_weight_error(w_writer, scale_channels, lambda w: _quant_weight(w, scheme))
            return total

        candidates = [self.alpha] if self.alpha is not None else list(np.linspace(0.0, 1.0, self.alphas))
        best_err, best, best_alpha = error(np.ones_like(a)), None, -1.0
        for alpha in candidates:
            sc = np.power(a, alpha) / np.power(wmax, 1.0 - alpha)
            sc = sc / math.exp(float(np.mean(np.log(sc))))
            sc = np.clip(sc, 1.0 / self.max_scale, self.max_scale)
            sc[dead] = 1.0  # a channel never non-zero has nothing to smooth; a tiny s would blow up its writer column
            err = error(sc)
            if err < best_err or (self.alpha is not None and best is None):
                best_err, best, best_alpha = err, sc, float(alpha)
        return best, best_alpha



def _quant_weight(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """w (in × out) rounded to the scheme's weight grid (max scales), as the search simulates it."""
    qmax = 127 if scheme.weight_bits == 8 else 7
    if scheme.block_size and w.shape[0] % scheme.block_size == 0:
        blocks = w.reshape(w.shape[0] // scheme.block_size, scheme.block_size, w.shape[1])
        scale = np.maximum(np.abs(blocks).max(axis=1, keepdims=True), 1e-12) / qmax
        return (np.clip(np.round(blocks / scale), -qmax, qmax) * scale).reshape(w.shape)
    if scheme.per_channel:
        scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / qmax
    else:
        scale = max(float(np.abs(w).max()), 1e-12) / qmax
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def _relative_weight_error(w: np.ndarray, scales: np.ndarray, quant) -> float:
    """‖(Q(W·diag(1/s)) − W·diag(1/s))·diag(s)‖² / ‖W‖²: the writer's weight error in its original units."""
    scaled = w / scales[None, :]
    err = (quant(scaled) - scaled) * scales[None, :]
    return float(np.sum(err.astype(np.float64) ** 2)) / max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)


def _fake_quant(x: np.ndarray, amax: float, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    scale = max(amax, 1e-12) / qmax
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale


# ----------------------------------------------------------------------------------------------------
# statistics


# ----------------------------------------------------------------------------------------------------
# sites


@dataclass(eq=False)
class Site:
    kind: str
    activation: ir.Value  # the quantized tensor the readers read
    readers: list[st.Linear]

    def group_max(self, per_channel: np.ndarray) -> np.ndarray:
        return per_channel

    def expand(self, scales: np.ndarray) -> np.ndarray:
        return scales

    def writer(self) -> st.Linear | None:
        """The linear layer whose weight columns take the 1/s (one per smoothing channel), if any."""
        return None

    def apply(self, graph: ir.Graph, namer: Namer, scales: np.ndarray) -> None:
        raise NotImplementedError

    def scale_readers(self, graph: ir.Graph, namer: Namer, per_act: np.ndarray) -> None:
        for lin in self.readers:
            set_weight_io(graph, namer, lin, per_act.astype(np.float64)[:, None] * lin.weight_io().astype(np.float64))


@dataclass(eq=False)
class NormSite(Site):
    norm: st.Norm = None
    shared: bool = False  # the norm output has non-linear readers too (post-norm)

    def apply(self, graph, namer, scales):
        norm, inv = self.norm, 1.0 / scales.astype(np.float64)
        if not self.shared and norm.op is not None:
            _set_norm_affine(graph, namer, norm, norm.op, inv)
            mark_changed(norm.output, "_smoothed", namer)
        elif not self.shared and norm.scale_node is not None:
            replace_initializer(_private(graph, namer, norm.scale_node, norm.scale), (norm.gamma().reshape(-1) * inv).astype(np.float32))
            if norm.bias_node is not None:
                replace_initializer(_private(graph, namer, norm.bias_node, norm.bias), (norm.beta().reshape(-1) * inv).astype(np.float32))
            mark_changed(norm.scale_node.outputs[0], "_smoothed", namer)
            mark_changed(norm.output, "_smoothed", namer)
        elif self.shared and norm.op is not None:
            # the linear readers get their own norm with γ/s, β/s; the other readers keep the original
            readers = [(lin.node, 0) for lin in self.readers]
            attrs = {k: a.value for k, a in norm.op.attributes.items()}
            inputs = list(norm.op.inputs)
            copy = ir.node(norm.op.op_type, inputs, attrs, domain=norm.op.domain,
                           name=namer.fresh(f"{norm.name}_smoothed"), num_outputs=1)
            copy.outputs[0].name = namer.fresh(f"{norm.output.name}_smoothed")
            copy.outputs[0].dtype, copy.outputs[0].shape = norm.output.dtype, norm.output.shape
            graph.insert_after(norm.op, copy)
            _set_norm_affine(graph, namer, norm, copy, inv)
            for node, index in readers:
                node.replace_input_with(index, copy.outputs[0])
        else:
            readers = [(lin.node, 0) for lin in self.readers]
            node = insert_elementwise(graph, namer, norm.output, "Mul", inv.astype(np.float32), f"{norm.name}_smooth",
                                         readers)
            node.outputs[0].name = namer.fresh(f"{norm.output.name}_smoothed")
        self.scale_readers(graph, namer, scales)


def _private(graph, namer, node, value):
    return private_weight(graph, namer, node, list(node.inputs).index(value))


def _set_norm_affine(graph, namer, norm: st.Norm, node: ir.Node, inv: np.ndarray) -> None:
    """Give fused norm `node` the scale γ/s and bias β/s (γ = 1 and β = 0 when absent)."""
    width = inv.size
    gamma = norm.gamma().reshape(-1) if norm.scale is not None else np.ones(width)
    g = add_initializer(graph, namer, f"{node.name}_scale", (gamma * inv).astype(np.float32))
    if len(node.inputs) > 1:
        node.replace_input_with(1, g)
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, g)
    if norm.bias is not None:
        b = add_initializer(graph, namer, f"{node.name}_bias", (norm.beta().reshape(-1) * inv).astype(np.float32))
        node.replace_input_with(2, b)


@dataclass(eq=False)
class VOSite(Site):
    att: st.Attention = None

    def group_max(self, per_channel):
        a = self.att
        per_head = per_channel.reshape(a.num_kv_heads, a.group_size, a.head_dim)
        return per_head.max(axis=1).reshape(-1)

    def expand(self, scales):
        a = self.att
        return np.repeat(scales.reshape(a.num_kv_heads, 1, a.head_dim), a.group_size, axis=1).reshape(-1)

    def writer(self):
        return self.att.v

    def apply(self, graph, namer, scales):
        a = self.att
        inv = 1.0 / scales.astype(np.float64)
        set_weight_io(graph, namer, a.v, a.v.weight_io().astype(np.float64) * inv[None, :])
        if a.v.bias is not None:
            set_bias(graph, namer, a.v, a.v.bias_array().astype(np.float64) * inv)
        self.scale_readers(graph, namer, self.expand(scales))
        for value in (a.v.node.outputs[0], a.v.output, *(n.outputs[0] for n in a.v_path), a.pv.outputs[0],
                      *(n.outputs[0] for n in a.o_path)):
            mark_changed(value, "_smoothed", namer)


@dataclass(eq=False)
class MLPSite(Site):
    mlp: st.MLP = None

    def folds_into_up(self) -> bool:
        m = self.mlp
        return m.kind in ("swiglu", "geglu", "relu") or (m.kind == "gelu" and m.gelu_divisor is not None)

    def writer(self):
        return self.mlp.up if self.folds_into_up() else None

    def apply(self, graph, namer, scales):
        m = self.mlp
        inv = 1.0 / scales.astype(np.float64)
        if self.folds_into_up():
            set_weight_io(graph, namer, m.up, m.up.weight_io().astype(np.float64) * inv[None, :])
            if m.up.bias is not None:
                set_bias(graph, namer, m.up, m.up.bias_array().astype(np.float64) * inv)
            mark_changed(m.up.node.outputs[0], "_smoothed", namer)
            mark_changed(m.up.output, "_smoothed", namer)
            if m.kind == "gelu":
                div = m.gelu_divisor
                c = const_array(div.inputs[1]).astype(np.float64).reshape(-1)  # √2, or √2/s after an earlier smooth
                new = c * inv if div.op_type == "Div" else c * scales.astype(np.float64)
                const = add_initializer(graph, namer, f"{div.name}_per_channel", new.astype(np.float32))
                div.replace_input_with(1, const)
            for node in m.act_nodes + ([m.product] if m.product is not None else []):
                for out in node.outputs:
                    mark_changed(out, "_smoothed", namer)
        else:
            node = insert_elementwise(graph, namer, m.down.input, "Mul", inv.astype(np.float32), f"{m.down.name}_smooth",
                                         [(m.down.node, 0)])
            node.outputs[0].name = namer.fresh(f"{m.down.input.name}_smoothed")
        self.scale_readers(graph, namer, scales)


def _rotated(site: Site) -> bool:
    return all(INPUT_ROTATED_KEY in lin.node.metadata_props for lin in site.readers)


def find_sites(s: st.Structure, kinds: list[str]) -> list[Site]:
    sites: list[Site] = []
    if "norm" in kinds:
        for norm in s.norms:
            readers, others = [], []
            for node, index in norm.output.uses():
                if node.op_type in ("Shape", "Size"):
                    continue
                lin = s.linear_at(node)
                (readers if lin is not None and index == 0 else others).append(lin or node)
            if not readers:
                continue
            sites.append(NormSite("norm", norm.output, readers, norm=norm, shared=bool(others) or norm.output.is_graph_output()))
    if "vo" in kinds:
        for att in s.attentions:
            if head_problem(att) is None:
                sites.append(VOSite("vo", att.o.input, [att.o], att=att))
    if "mlp" in kinds:
        for mlp in s.mlps:
            if len(mlp.down.input.uses()) == 1:
                sites.append(MLPSite("mlp", mlp.down.input, [mlp.down], mlp=mlp))
    return sites
