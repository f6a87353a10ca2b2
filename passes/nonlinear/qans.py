"""qans: quantize softmax inputs after numerical stabilisation (FQ-PETR's QANS).

Kind: approximate. Each Softmax(x) becomes
    d = x - max(x)                 (exact: softmax(d) = softmax(x))
    c = clip(d, -β, 0)             (probabilities change by at most e^-β relative; e^-20 ≈ 2e-9)
    q = Q/DQ(c + β/2)              (symmetric INT8, scale β/254, zero point 0: TensorRT rules)
then, with `exp: float`, Softmax(q); with `exp: lut8`, an exact table of exp indexed by the INT8
code (entry -127, the clip floor, is 0 so clipped and masked positions get no probability) holding
fixed-point integers E = round(e^v · 2^15), their row sum S and an integer-friendly division (one
division per row, M = ⌊2^R / S⌋ with R = 31 + ⌈log2 max_row⌉ so M keeps 16 bits, then p = E · M / 2^R);
with `exp: dulut`, the DULUT of exp on the dequantized input (same sum and division).

Shifting by β/2 (`centre`, on by default) puts the clipped range [-β, 0] on [-β/2, β/2], so the
zero-point-0 INT8 grid uses all 255 codes (step β/254) instead of the negative half (step β/127);
softmax is shift-invariant, so the shift costs nothing. The quantization is what bounds the error:
each unnormalised term is off by a factor within e^(±s/2), s = β/254, so each probability is
within a factor e^(±s) of exact (about ±4% at β = 10), before clipping's e^-β. β is calibrated per
Softmax: the candidate minimising the mean total-variation distance between the exact and the
QANS softmax over calibration rows (masked rows included). The measured max/mean error per op, in
INT8 output steps (1/255 of [0, 1]), is stored in `onnxq.fidelity`.

Run it after `quantize` (recipe full-int8 does): the rule tables then never see the emitted ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, attr, opset_version
from onnxq.passes.nonlinear.emit import Builder, emit_dulut, record_fidelity
from onnxq.passes.nonlinear.lut import build_dulut
from onnxq.passes.nonlinear.softmax import exact_softmax, softmax_nodes
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext
from onnxq.stats.samples import sample_rows

FIXED_POINT = 15  # exp table entries are integers round(e^v · 2^15)
STEP = 1.0 / 255  # one INT8 output step of a probability


@dataclass(frozen=True)
class Qans(GraphPass):
    name: ClassVar[str] = "qans"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    beta: float = option(0.0, low=0.0)  # 0: calibrate per Softmax from `candidates`
    candidates: list[float] = option([4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0], above=0.0)
    centre: bool = True               # shift by β/2 so the INT8 grid covers [-β, 0] with all 255 codes
    exp: Literal["float", "lut8", "dulut"] = "lut8"
    entries: list[int] = option([32, 32], low=2)  # DULUT sizes for exp: dulut
    max_row: int = option(2048, low=1)  # longest softmax row the division is sized for
    rows: int = option(4096, low=1)     # calibration rows sampled per Softmax (β search and fidelity)
    attention_only: bool = False      # only the Softmaxes onnxq.analysis.structure places in attention (QKᵀ → PV)
    exclude: list[str] = field(default_factory=list)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        nodes = softmax_nodes(model, self.attention_only, self.exclude)
        if not nodes:
            return {"replaced": 0}
        data = ctx.require_calibration(self.name)
        samples = sample_rows(model, {n.inputs[0].name: attr(n, "axis", -1) for n in nodes}, data, self.rows,
                              show_progress=ctx.show_progress)
        entries, betas = [], []
        for node in nodes:
            rows = samples.get(node.inputs[0].name)
            if rows is None or not len(rows):
                continue
            beta = self.beta or choose_beta(rows, self.candidates, self.centre, floor_is_zero=self.exp != "float")
            p_hat, replacement = self._rewrite(model, namer, node, beta, opset_version(model), rows)
            ref = exact_softmax(rows)
            err = np.abs(p_hat - ref) / STEP
            entries.append({"pass": self.name, "node": node.name, "function": "softmax",
                            "replaced_ops": ["Softmax"] if self.exp != "float" else [],
                            "method": f"qans beta={beta:g} exp={self.exp}", "range": [-beta, 0.0],
                            "output_step": STEP, "max_steps": round(float(err.max()), 4),
                            "mean_steps": round(float(err.mean()), 4), "input_quantized": True,
                            "replacement": replacement})
            betas.append(beta)
        record_fidelity(model, entries)
        graph.sort()
        return {"replaced": len(entries), "beta": sorted(set(betas)),
                "max_error_steps": round(max(e["max_steps"] for e in entries), 3) if entries else 0.0}

    def _rewrite(self, model: ir.Model, namer: Namer, node: ir.Node, beta: float, opset: int,
                 rows: np.ndarray) -> tuple[np.ndarray, str]:
        """Emit the QANS form of `node`; return what it computes on the sampled rows (float64) and
        the label its nodes carry."""
        axis = attr(node, "axis", -1)
        x, out = node.inputs[0], node.outputs[0]
        b = Builder(model.graph, namer, node.name or out.name, f"softmax '{node.name}' (qans, beta={beta:g})")
        peak = b.reduce("ReduceMax", x, axis, opset, suffix="row_max")
        c = b.op("Clip", b.op("Sub", x, peak, suffix="stabilised"), b.const("neg_beta", -beta), b.const("zero", 0.0),
                 suffix="clipped")
        if self.centre:
            c = b.op("Add", c, b.const("half_beta", beta / 2), suffix="centred")
        scale = np.float32((beta / 2 if self.centre else beta) / 127)
        offset = beta / 2 if self.centre else 0.0
        q = b.qdq(c, scale)
        rows_q = _quantized_input(rows, beta, self.centre)
        if self.exp == "float":  # keep the Softmax op, now reading the quantized input
            b.insert(node)
            node.replace_input_with(0, q)
            return exact_softmax(rows_q), b.replaces
        if self.exp == "lut8":
            table = exp_table(scale, offset)
            code = b.op("Round", b.op("Mul", q, b.const("inv_scale", np.float32(1.0) / scale), suffix="codes"),
                        suffix="code")
            index = b.op("Cast", b.op("Add", code, b.const("code_offset", 128.0), suffix="table_index_f"),
                         suffix="table_index", to=ir.DataType.INT32)
            e = b.op("Gather", b.const("exp_table", table), index, suffix="exp", axis=0)
            e_rows = table[np.round(rows_q / scale).astype(int) + 128].astype(np.float64)
        else:
            lut = build_dulut("exp", -beta, 0.0, tuple(self.entries))
            lut.values = (lut.values * np.float32(2 ** FIXED_POINT)).astype(np.float32)
            shifted = b.op("Sub", q, b.const("uncentre", offset), suffix="uncentred") if offset else q
            e = emit_dulut(b, shifted, lut)
            e_rows = lut((rows_q - offset).astype(np.float32)).astype(np.float64)
        total = b.reduce("ReduceSum", e, axis, opset, suffix="row_sum")
        r = 31 + math.ceil(math.log2(max(self.max_row, 2)))
        multiplier = b.op("Floor", b.op("Div", b.const("two_r", 2.0 ** r), total, suffix="reciprocal"),
                          suffix="multiplier")
        p = b.op("Mul", b.op("Mul", e, multiplier, suffix="scaled"), b.const("two_minus_r", 2.0 ** -r), suffix="probs")
        b.finish(node, out, p, remove=[node])
        return e_rows / np.maximum(e_rows.sum(axis=-1, keepdims=True), 1e-300), b.replaces


def exp_table(scale: float, offset: float) -> np.ndarray:
    """E[k] = round(exp((k - 128)·scale - offset) · 2^15), k = 0..255, with the clip floor (codes -128
    and -127) at 0: exact per code, integers, so the row sums are exact too."""
    codes = np.arange(-128, 128, dtype=np.float64)
    table = np.round(np.exp(np.minimum(codes * np.float64(scale) - offset, 0.0)) * 2.0 ** FIXED_POINT)
    table[:2] = 0.0
    return table.astype(np.float32)


def _quantized_input(rows: np.ndarray, beta: float, centre: bool) -> np.ndarray:
    """What the DequantizeLinear gives: clip(x - max, -β, 0) (+ β/2), on the INT8 grid (float64)."""
    rows = np.asarray(rows, dtype=np.float32)
    c = np.clip(rows - rows.max(axis=-1, keepdims=True), -beta, 0).astype(np.float64)
    scale = np.float32((beta / 2 if centre else beta) / 127)
    if centre:
        c = c + beta / 2
    return np.clip(np.round(c / scale), -127, 127) * np.float64(scale)


def choose_beta(rows: np.ndarray, candidates: list[float], centre: bool, *, floor_is_zero: bool = True) -> float:
    """The β whose QANS softmax is closest to the exact one in mean total variation. The integer exps
    (lut8, dulut) give the clip floor zero probability; a float Softmax (exp: float) gives it e^-β, so
    there a small β leaks mass to every clipped key (a cross-attention row of thousands of keys)."""
    ref = exact_softmax(rows)
    best, best_err = candidates[0], np.inf
    for beta in candidates:
        q = _quantized_input(rows, beta, centre)
        e = np.exp(q - q.max(axis=-1, keepdims=True))
        if floor_is_zero:
            scale = (beta / 2 if centre else beta) / 127
            floor = q <= q.min(axis=-1, keepdims=True) + 0.5 * scale
            floor &= q <= (-beta / 2 if centre else -beta) + 0.5 * scale
            e = np.where(floor, 0.0, e)
        p = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)
        err = 0.5 * np.abs(p - ref).sum(axis=-1).mean()
        if err < best_err:
            best, best_err = beta, err
    return float(best)


