"""integer_ops: I-LLM's integer-only softmax and normalisation as float-carried integer subgraphs.

Kind: approximate. The algorithms and their NumPy integer reference are in integer_ref.py
(DI-Exp, DI-ClippedSoftmax, DI-Norm for LayerNorm and RMSNorm); this pass emits them with every
integer carried exactly in float32 (all intermediates stay below 2^24): `a >> k` is
Floor(a · 2^-k), a shift by a per-element amount q is Floor(a · T[q]) with T a 32-entry table of
2^-q (a Gather, in place of Pow), integer division is Floor(Div), comparisons in the bit-wise
square root are LessOrEqual + Where. No BitShift or Mod (TensorRT parses neither), and the result
is bit-exact to the reference (tests/test_integer_ops.py).

Error bounds (measured per op on calibration rows, in INT8 output steps, stored in
`onnxq.fidelity`): DI-ClippedSoftmax is limited by its 8-bit input (step c/255), the linear
2^f ≈ 1 + f/2 of DI-Exp (≤ 6% per term) and its 127-level output (±0.5 step); DI-Norm by the
per-token 12-bit requantization of its input (relative step 1/2047 of the token's max |x|) and
the 12-bit square root.

Softmax rows of masked positions behave as with a clip: Δ < -c gives e = 0 or nearly so.
Run it after `quantize` (recipe full-int8 does): the rule tables then never see the emitted ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis.structure import find_norms
from onnxq.ir.graph import Namer, attr, opset_version
from onnxq.passes.nonlinear.emit import Builder, record_fidelity
from onnxq.passes.nonlinear.integer_ref import NormParams, SoftmaxParams, di_exp_step, di_norm, di_softmax
from onnxq.passes.nonlinear.softmax import exact_softmax, softmax_nodes
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext
from onnxq.stats.samples import sample_rows

F32 = np.float32


@dataclass
class NormSite:
    """A normalisation over the last axis to replace: output = (x - mean?) / rms · gamma + beta."""

    x: ir.Value
    y: ir.Value
    width: int
    rms: bool
    gamma: np.ndarray | None
    beta: np.ndarray | None
    nodes: list[ir.Node]     # what the replacement removes
    label: str


def norm_sites(model: ir.Model) -> list[NormSite]:
    """LayerNorm/RMSNorm over the last axis, fused or decomposed, as onnxq.analysis finds them."""
    order = {node: i for i, node in enumerate(model.graph)}
    found = []
    for norm in find_norms(model):
        if norm.input.dtype != ir.DataType.FLOAT or not isinstance(norm.width, int):
            continue
        nodes = sorted(norm.nodes, key=lambda n: order.get(n, 0))
        found.append(NormSite(norm.input, norm.output, norm.width, norm.kind == "rms", norm.gamma(), norm.beta(), nodes,
                          norm.name or norm.output.name))
    return found


@dataclass(frozen=True)
class IntegerOps(GraphPass):
    name: ClassVar[str] = "integer_ops"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    ops: list[Literal["softmax", "norm"]] = option(["softmax", "norm"])
    clip: float = option(15.0, above=0.0)    # DI-ClippedSoftmax: Δ clipped to [-c, 0]
    softmax_bits: int = option(8, low=2, high=16)  # input bits of DI-ClippedSoftmax
    out_levels: int = option(127, low=1)     # softmax output levels (127: what a symmetric INT8 Q/DQ holds exactly)
    max_row: int = option(1024, low=1)       # longest softmax row the integer sums are sized for
    norm_bits: int = option(12, low=2, high=16)  # DI-Norm per-token requantization width
    rows: int = option(2048, low=1)          # calibration rows sampled per op for the fidelity figures
    attention_only: bool = False  # softmax: only those onnxq.analysis.structure places in attention
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):  # the bounds that tie options together
        SoftmaxParams(self.clip, self.softmax_bits, self.out_levels, self.max_row).check()

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        opset = opset_version(model)
        softmaxes = softmax_nodes(model, self.attention_only, self.exclude) if "softmax" in self.ops else []
        norms = [m for m in norm_sites(model) if "norm" in self.ops and m.label not in self.exclude]
        if not softmaxes and not norms:
            return {"replaced": 0}
        data = ctx.require_calibration(self.name)
        samples = _sample(model, softmaxes, norms, data, self.rows, ctx.show_progress)
        entries = []
        params = SoftmaxParams(self.clip, self.softmax_bits, self.out_levels, self.max_row)
        for node in softmaxes:
            rows = samples.get(node.inputs[0].name)
            axis = attr(node, "axis", -1)
            b = Builder(graph, namer, node.name or node.outputs[0].name, f"softmax '{node.name}' (DI-ClippedSoftmax)")
            p = emit_di_softmax(b, node.inputs[0], params, axis, opset)
            b.finish(node, node.outputs[0], p, remove=[node])
            entries.append(_entry(self.name, node.name, "softmax", ["Softmax"],
                                  f"DI-ClippedSoftmax c={self.clip:g} in={self.softmax_bits}b out={self.out_levels}",
                                  rows, lambda r: di_softmax(r, params), exact_softmax, 1.0 / 255, [-self.clip, 0.0],
                                  b.replaces))
        # A norm may read another's output (a final norm after the last layer's): its input is then the
        # replacement, and its rows are found by the name sampled before any value was renamed.
        input_names = [norm.x.name for norm in norms]
        replaced: dict[ir.Value, ir.Value] = {}
        for i, norm in enumerate(norms):
            p = NormParams(norm.width, norm.rms, self.norm_bits)
            p.check()
            what = "RMSNorm" if norm.rms else "LayerNorm"
            b = Builder(graph, namer, norm.label, f"{what} '{norm.label}' (DI-Norm)")
            y = emit_di_norm(b, replaced.get(norm.x, norm.x), p, norm.gamma, norm.beta, opset)
            b.finish(norm.nodes[0], norm.y, y, remove=norm.nodes)
            replaced[norm.y] = y
            rows = samples.get(input_names[i])
            ops = [n.op_type for n in norm.nodes]
            entries.append(_entry(self.name, norm.label, what.lower(), ops, f"DI-Norm {self.norm_bits}b", rows,
                                  lambda r, p=p, norm=norm: di_norm(r, p, norm.gamma, norm.beta),
                                  lambda r, norm=norm: _norm(r, norm.rms, norm.gamma, norm.beta), None, None, b.replaces))
        record_fidelity(model, entries)
        graph.sort()
        return {"replaced": len(entries), "softmax": len(softmaxes), "norm": len(entries) - len(softmaxes),
                "max_error_steps": round(max((e["max_steps"] for e in entries), default=0.0), 3)}


def _sample(model, softmaxes, norms, data, rows, show_progress) -> dict[str, np.ndarray]:
    """Calibration rows of every Softmax input (along its axis) and norm input, in one pass."""
    axes = {n.inputs[0].name: attr(n, "axis", -1) for n in softmaxes}
    axes.update({m.x.name: -1 for m in norms})
    return sample_rows(model, axes, data, rows, show_progress=show_progress)


def _entry(pass_name, node, function, ops, method, rows, approx, exact, step, input_range, replacement) -> dict:
    """A fidelity record measured on the sampled calibration rows (the input is requantized inside the
    replacement, per token for DI-Norm, so it counts as quantized)."""
    entry = {"pass": pass_name, "node": node, "function": function, "replaced_ops": ops, "method": method,
             "input_quantized": True, "replacement": replacement}
    if rows is not None and len(rows):
        ref = exact(rows.astype(np.float64))
        got = approx(rows).astype(np.float64)
        step = step or (float(ref.max() - ref.min()) / 255 or 1.0)
        err = np.abs(got - ref) / step
        entry.update({"range": input_range or [float(rows.min()), float(rows.max())], "output_step": step,
                      "max_steps": round(float(err.max()), 4), "mean_steps": round(float(err.mean()), 4)})
    return entry


def _norm(rows, rms, gamma, beta):
    d = rows if rms else rows - rows.mean(axis=-1, keepdims=True)
    y = d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + 1e-30)
    if gamma is not None:
        y = y * gamma
    return y if beta is None else y + beta


# ---------------------------------------------------------------------------------------------
# Emission (the same arithmetic as integer_ref.py, each integer carried exactly in float32)


def _shift_right(b: Builder, a: ir.Value, k: int, name: str) -> ir.Value:
    """a >> k for a constant k: Floor(a · 2^-k)."""
    return b.op("Floor", b.op("Mul", a, b.const(f"{name}_pow2", 2.0 ** -k), suffix=f"{name}_scaled"), suffix=name)


def emit_di_exp(b: Builder, x_int: ir.Value, m: int, k: int, precision: int, max_q: int) -> ir.Value:
    """DI-Exp of float-carried integers x_I <= 0 (scale m/2^k): e_I = (((r >> 1) + s) << P) >> q."""
    s = di_exp_step(m, k)
    q = b.op("Floor", b.op("Div", x_int, b.const("minus_s", -float(s)), suffix="exp_q_ratio"), suffix="exp_q")
    r = b.op("Add", x_int, b.op("Mul", q, b.const("s", float(s)), suffix="exp_qs"), suffix="exp_r")
    base = b.op("Mul", b.op("Add", _shift_right(b, r, 1, "exp_half_r"), b.const("s_plus", float(s)), suffix="exp_linear"),
                b.const("two_p", 2.0 ** precision), suffix="exp_base")
    q_index = b.op("Cast", b.op("Min", q, b.const("q_max", float(max_q)), suffix="exp_q_capped"),
                   suffix="exp_q_index", to=ir.DataType.INT32)
    inv_pow2 = b.op("Gather", b.const("inv_pow2", 2.0 ** -np.arange(max_q + 1)), q_index, suffix="exp_shift", axis=0)
    return b.op("Floor", b.op("Mul", base, inv_pow2, suffix="exp_shifted"), suffix="exp_int")


def emit_di_softmax(b: Builder, x: ir.Value, p: SoftmaxParams, axis: int, opset: int) -> ir.Value:
    """DI-ClippedSoftmax: Δ = x - max, x_I = max(round(clip(Δ, -c, 0) · 2^k/m), -L_in), e_I = DI-Exp,
    M = (L_out << R) // Σ e_I, p_I = (e_I · M) >> R, output p_I / L_out."""
    m, k = p.mk
    delta = b.op("Sub", x, b.reduce("ReduceMax", x, axis, opset, suffix="row_max"), suffix="stabilised")
    clipped = b.op("Clip", delta, b.const("neg_c", -p.clip), b.const("zero", 0.0), suffix="clipped")
    x_int = b.op("Max", b.op("Round", b.op("Mul", clipped, b.const("inv_scale", F32(2 ** k / m)), suffix="codes"),
                             suffix="code"), b.const("code_min", -float(p.in_levels)), suffix="x_int")
    max_q = 31
    e = emit_di_exp(b, x_int, m, k, p.precision, max_q)
    total = b.reduce("ReduceSum", e, axis, opset, suffix="row_sum")
    multiplier = b.op("Floor", b.op("Div", b.const("levels_r", float(p.out_levels << p.shift)), total,
                                    suffix="multiplier_ratio"), suffix="multiplier")
    p_int = _shift_right(b, b.op("Mul", e, multiplier, suffix="scaled"), p.shift, "p_int")
    return b.op("Mul", p_int, b.const("out_scale", F32(1.0 / p.out_levels)), suffix="probs")


def emit_di_norm(b: Builder, x: ir.Value, p: NormParams, gamma, beta, opset: int) -> ir.Value:
    """DI-Norm over the last axis (see integer_ref.di_norm_int)."""
    amax = b.op("Max", b.reduce("ReduceMax", b.op("Abs", x, suffix="abs"), -1, opset, suffix="token_max"),
                b.const("tiny", 1e-30), suffix="token_max_safe")
    inv = b.op("Div", b.const("levels", float(p.K)), amax, suffix="token_scale")
    x_int = b.op("Round", b.op("Mul", x, inv, suffix="requantize"), suffix="x_int")
    if p.rms:
        d = x_int
    else:
        total = b.reduce("ReduceSum", x_int, -1, opset, suffix="sum")
        mean = b.op("Floor", b.op("Div", total, b.const("hidden", float(p.hidden)), suffix="mean_ratio"), suffix="mean")
        d = b.op("Sub", x_int, mean, suffix="centred")
    square = b.op("Mul", d, d, suffix="square")
    k = p.square_shift
    if k:
        square = _shift_right(b, b.op("Add", square, b.const("square_round", float(1 << (k - 1))), suffix="square_biased"),
                              k, "square_shifted")
    q = b.reduce("ReduceSum", square, -1, opset, suffix="sum_squares")
    root = None
    for bit in range(p.sqrt_bits - 1, -1, -1):  # digit-by-digit integer square root
        step = b.const(f"sqrt_bit{bit}", float(1 << bit))
        cand = step if root is None else b.op("Add", root, step, suffix=f"sqrt_try{bit}")
        fits = b.op("LessOrEqual", b.op("Mul", cand, cand, suffix=f"sqrt_sq{bit}"), q, suffix=f"sqrt_fits{bit}")
        root = b.op("Where", fits, cand, b.const("zero", 0.0) if root is None else root, suffix=f"sqrt_root{bit}")
    over = b.op("Greater", b.op("Sub", q, b.op("Mul", root, root, suffix="sqrt_floor_sq"), suffix="sqrt_rest"), root,
                suffix="sqrt_round_up")
    root = b.op("Where", over, b.op("Add", root, b.const("one", 1.0), suffix="sqrt_plus_one"), root, suffix="sqrt")
    r = b.op("Max", root, b.const("one_min", 1.0), suffix="rms_int")
    numerator = b.op("Add", b.op("Mul", d, b.const("frac_scale", float(1 << (p.frac_bits + 1))), suffix="scaled"), r,
                     suffix="rounded_numerator")
    y_int = b.op("Floor", b.op("Div", numerator, b.op("Mul", r, b.const("two", 2.0), suffix="twice_rms"),
                               suffix="ratio"), suffix="y_int")
    g = F32(p.out_scale) * (np.ones(p.hidden, F32) if gamma is None else np.asarray(gamma, F32))
    y = b.op("Mul", y_int, b.const("gamma_scaled", g.astype(F32)), suffix="scaled_out")
    return y if beta is None else b.op("Add", y, b.const("beta", np.asarray(beta, F32)), suffix="out")
