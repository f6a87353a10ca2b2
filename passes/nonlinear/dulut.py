"""dulut: replace GELU, SiLU/Swish, Sigmoid, Softplus, Tanh, HardSwish and Exp by lookup tables.

Kind: approximate. Each matched function f of one tensor x becomes FQ-PETR's dual lookup table
(lut.py: LUT1 maps the calibrated range of x to a non-uniform index, LUT2 holds function
values read with linear interpolation; 32 + 32 entries by default, allocation refined by the
measured error). Bound: over the calibrated range the table stays below one INT8 output step,
(max f - min f) / 255; measured per op at build time (typically 0.02-0.15 steps for 32 + 32), stored
in the model (metadata `onnxq.fidelity`, printed by `onnxq inspect`) and asserted by
tests/test_dulut_pass.py. Outside the calibrated range the output follows f's asymptote (slope 1
for GELU/SiLU/Softplus/HardSwish, constant otherwise; exp saturates at its calibrated maximum).

With `lut8`, a function whose input arrives per-tensor INT8 (a DequantizeLinear of scale s) gets the
exact 256-entry table T[q + 128] = f(q·s) instead, indexed by the code: exact on every value the
input can take. `quantize_input` first puts a symmetric INT8 Q/DQ (calibrated max) on the input, so
every function gets the exact table; the bound then also counts the input's rounding (≤ s/2 · max|f'|).

Functions are recognised by value, not by op pattern: around each anchor op (Gelu, Erf, Tanh,
Sigmoid, Softplus, HardSwish, HardSigmoid, Swish, Exp) the pass tries the regions between a tensor x
upstream and a tensor y downstream that are computed from x and constants only, evaluates each on
test points and keeps the largest one that equals a known function. So the Erf and the tanh forms of
GELU, x·σ(x), x·σ(1.702x) and the single ops are all found, whatever the exporter's operand order or
association. Per-channel constants are allowed when every channel computes f(a_j·x)/a_j (what the
smooth pass leaves of GELU/SiLU: S-GELU); the table then reads a·x and the output is divided by a.

Run it after `quantize` (recipe full-int8 does): the Q/DQ rule tables then never see the emitted ops
(the ort-cpu table would otherwise put Q/DQ on the index arithmetic). The emission is in emit.py.

The emitted ops are Clip, Sub, Mul, Floor, Min, Cast (to INT32), Gather, Add and Max/Relu for the
tails: all parse in TensorRT and run in ONNX Runtime. Tables are
initializers named after the replaced node (`<node>_lut1`, `<node>_lut2`, ...); every emitted node
carries node metadata `onnxq.replacement`, naming what it replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, attr, const_array, is_const
from onnxq.passes.nonlinear.emit import Builder, dq_params, emit_dulut, emit_lut8, record_fidelity
from onnxq.passes.nonlinear.lut import (
    FUNCTIONS,
    Fidelity,
    Function,
    build_dulut,
    build_uniform,
    erf,
    fidelity,
    get_function,
)
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext
from onnxq.quant.qdq import INT8, activation_params
from onnxq.stats.observers import Range, Ranges
from onnxq.stats.service import observe

ANCHORS = ("Gelu", "Erf", "Tanh", "Sigmoid", "Softplus", "HardSwish", "HardSigmoid", "Swish", "Exp")
_FLOAT = {ir.DataType.FLOAT}


# ---------------------------------------------------------------------------------------------
# Recognising functions by value


@dataclass
class Region:
    x: ir.Value
    y: ir.Value
    nodes: list[ir.Node]
    function: str
    scale: np.ndarray | None = None  # per-channel a: y = f(a·x) / a (smoothing's S-GELU / S-SiLU), else None


_TEST_X = np.linspace(-6.0, 6.0, 97)[:, None]  # test points (column: channels broadcast along the last axis)
_CURVE_X = np.array([-1e-2, 0.0, 1e-2])[:, None]  # where the per-channel scale is read off
_UNARY = {"Erf", "Tanh", "Sigmoid", "Exp", "Softplus", "HardSwish", "HardSigmoid", "Gelu", "Relu", "Neg", "Sqrt",
          "Reciprocal", "Identity", "Swish", "Abs"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
_SCALABLE = ("gelu", "gelu_tanh", "quick_gelu", "silu", "softplus")  # f''(0) != 0: the scale can be read off


def _eval_node(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    """One node of a candidate region in float64. Not onnx's ReferenceEvaluator: it computes Erf in
    float32, and the per-channel scale `_identify_scaled` reads off a second difference at h = 1e-2
    then changes in its last float32 bit (measured on BERT's GELU). ORT has no float64 Erf either."""
    op = node.op_type
    a = args[0]
    if op == "Add":
        return a + args[1]
    if op == "Sub":
        return a - args[1]
    if op == "Mul":
        return a * args[1]
    if op == "Div":
        return a / args[1]
    if op == "Pow":
        return np.power(a, args[1])
    if op == "Gelu":
        name = "gelu_tanh" if attr(node, "approximate", "none") == "tanh" else "gelu"
        return FUNCTIONS[name](a)
    if op == "Swish":
        return a * FUNCTIONS["sigmoid"](attr(node, "alpha", 1.0) * a)
    if op == "HardSigmoid":
        return np.clip(attr(node, "alpha", 0.2) * a + attr(node, "beta", 0.5), 0, 1)
    table = {"Erf": erf, "Tanh": np.tanh,
             "Sigmoid": FUNCTIONS["sigmoid"], "Exp": np.exp, "Softplus": FUNCTIONS["softplus"],
             "HardSwish": FUNCTIONS["hardswish"], "Relu": lambda v: np.maximum(v, 0), "Neg": np.negative,
             "Sqrt": np.sqrt, "Reciprocal": lambda v: 1 / v, "Identity": lambda v: v, "Abs": np.abs}
    return table[op](a)


def _constant(v: ir.Value) -> np.ndarray | None:
    """A float constant usable elementwise: a scalar, or a vector along the last axis."""
    const = const_array(v)
    if const is None or const.dtype.kind != "f":
        return None
    if const.size == 1:
        return const.astype(np.float64).reshape(())
    if const.ndim >= 1 and const.size == const.shape[-1]:
        return const.astype(np.float64).reshape(-1)
    return None


def _evaluate(y: ir.Value, x: ir.Value, points: np.ndarray = _TEST_X) -> tuple[np.ndarray, list[ir.Node]] | None:
    """y as a function of x at `points` (T x 1, or T x C when per-channel constants take part), with the
    nodes that compute it; None if y depends on anything but x and constants, or on an unknown op."""
    memo: dict[ir.Value, np.ndarray] = {}
    nodes: list[ir.Node] = []

    def value_of(v: ir.Value) -> np.ndarray | None:
        if v is x:
            return points
        if v in memo:
            return memo[v]
        const = _constant(v)
        if const is not None:
            return const
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 \
                or node.op_type not in _UNARY | _BINARY or len(nodes) > 16:
            return None
        args = []
        for inp in node.inputs:
            arg = value_of(inp) if inp is not None else None
            if arg is None:
                return None
            args.append(arg)
        with np.errstate(all="ignore"):
            try:
                memo[v] = _eval_node(node, args)
            except ValueError:  # vectors that do not broadcast
                return None
        nodes.append(node)
        return memo[v]

    result = value_of(y)
    if result is None or not nodes or np.ndim(result) != 2 or result.shape[0] != len(points):
        return None
    return result, nodes


def _closed(nodes: list[ir.Node], y: ir.Value) -> bool:
    """True when nothing outside the region reads its intermediate tensors."""
    inside = set(nodes)
    for node in nodes:
        for out in node.outputs:
            if out is y:
                continue
            if out.is_graph_output() or any(user not in inside for user in out.consumers()):
                return False
    return True


def _identify(values: np.ndarray, allowed: set[str]) -> str | None:
    """The allowed function the values (T x 1) match (to float32 constants' precision), the closest if several."""
    if values.shape[1] != 1 or not np.all(np.isfinite(values)):
        return None
    values = values[:, 0]
    best, best_err = None, np.inf
    for name in sorted(allowed):
        ref = FUNCTIONS[name](_TEST_X[:, 0])
        err = np.abs(values - ref).max() / (1.0 + np.abs(ref).max())
        if err <= 1e-5 and err < best_err:
            best, best_err = name, err
    return best


def _identify_scaled(y: ir.Value, x: ir.Value, values: np.ndarray, allowed: set[str]) -> tuple[str, np.ndarray] | None:
    """(f, a) when every channel j computes f(a_j·x) / a_j, a_j > 0 (smoothing folded into the function)."""
    if values.shape[1] == 1 or not np.all(np.isfinite(values)):
        return None
    curve = _evaluate(y, x, _CURVE_X)
    if curve is None or curve[0].shape != (3, values.shape[1]):
        return None
    c = curve[0]
    h = _CURVE_X[2, 0]
    second = (c[0] - 2 * c[1] + c[2]) / h ** 2
    for name in sorted(set(allowed) & set(_SCALABLE)):
        fn = FUNCTIONS[name]
        f2 = float((fn(np.array([-h, 0.0, h])) @ np.array([1.0, -2.0, 1.0])) / h ** 2)
        a = second / f2
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            continue
        t = _TEST_X[:, 0][:, None]
        ref = fn(t * a) / a
        if np.abs(values - ref).max() / (1.0 + np.abs(ref).max()) <= 1e-4:
            return name, a
    return None


def _upstream(value: ir.Value, depth: int = 4) -> list[ir.Value]:
    """value and the tensors it is computed from through elementwise ops (the candidates for x),
    nearest first."""
    found, frontier = [value], [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            node = v.producer()
            if node is None or node.op_type not in _BINARY | _UNARY:
                continue
            for inp in node.inputs:
                if inp is not None and not is_const(inp) and inp not in found:
                    found.append(inp)
                    nxt.append(inp)
        frontier = nxt
    return found


def _downstream(value: ir.Value, depth: int = 5) -> list[ir.Value]:
    chain = [value]
    for _ in range(depth):
        users = value.consumers()
        if len(users) != 1 or users[0].op_type not in _BINARY | {"Identity"} or len(users[0].outputs) != 1:
            break
        value = users[0].outputs[0]
        chain.append(value)
    return chain


def find_functions(graph: ir.Graph, allowed: set[str], exclude: set[str] = frozenset()) -> list[Region]:
    """Every region of `graph` that computes one of the `allowed` functions of one tensor."""
    regions, taken = [], set()
    for anchor in list(graph):
        if anchor.op_type not in ANCHORS or anchor.domain not in ("", "ai.onnx") or anchor in taken \
                or anchor.name in exclude or anchor.inputs[0] is None or anchor.inputs[0].dtype not in _FLOAT:
            continue
        best = None
        for y in reversed(_downstream(anchor.outputs[0])):
            for x in reversed(_upstream(anchor.inputs[0])):
                found = _evaluate(y, x)
                if found is None or anchor not in found[1] or not _closed(found[1], y):
                    continue
                name, scale = _identify(found[0], allowed), None
                if name is None:
                    name, scale = _identify_scaled(y, x, found[0], allowed) or (None, None)
                if name is not None and (best is None or len(found[1]) > len(best.nodes)):
                    best = Region(x, y, found[1], name, scale)
            if best is not None:
                break
        if best is not None and not taken.intersection(best.nodes):
            regions.append(best)
            taken.update(best.nodes)
    return regions


# ---------------------------------------------------------------------------------------------
# The pass


@dataclass(frozen=True)
class Dulut(GraphPass):
    name: ClassVar[str] = "dulut"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    functions: list[str] = field(default_factory=lambda: ["gelu", "gelu_tanh", "quick_gelu", "silu", "sigmoid",
                                                          "softplus", "tanh", "hardswish", "hardsigmoid", "exp"])
    entries: list[int] = option([32, 32], low=2)  # table sizes: each level needs two entries
    table: Literal["dulut", "uniform"] = "dulut"  # two levels, or one level of entries[0] values
    lut8: bool = False            # exact 256-entry table where the input is per-tensor INT8
    quantize_input: bool = False  # insert a symmetric INT8 Q/DQ on each input first (then every table is lut8)
    margin: float = option(0.0, low=0.0)  # widen the calibrated input range by this fraction on each side
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        unknown = sorted(set(self.functions) - set(FUNCTIONS))
        if unknown:
            raise ValueError(f"unknown functions {unknown} (known: {', '.join(FUNCTIONS)})")
        if len(self.entries) != (2 if self.table == "dulut" else 1) and not (self.table == "uniform" and self.entries):
            raise ValueError("entries: [N1, N2] for dulut, [N] for uniform")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        regions = find_functions(graph, set(self.functions), set(self.exclude))
        if not regions:
            return {"replaced": 0}
        need_range = [r for r in regions if self.quantize_input or r.scale is not None
                      or not (self.lut8 and dq_params(r.x))]
        ranges = {}
        if need_range:
            data = ctx.require_calibration(self.name)
            ranges = _input_ranges(model, need_range, data, ctx.show_progress)
        entries, counts, skipped = [], {"dulut": 0, "uniform": 0, "lut8": 0}, []
        replaced: dict[ir.Value, ir.Value] = {}  # a region's output that is the next region's input
        input_names = [r.x.name for r in regions]   # before replacements rename anything
        for region, input_name in zip(regions, input_names):
            rng = ranges.get(input_name)
            region.x = replaced.get(region.x, region.x)
            old_y = region.y
            entry = self._replace(model, namer, region, rng)
            if entry is None:
                skipped.append(region.nodes[-1].name)
                continue
            replaced[old_y] = region.y
            entries.append(entry)
            counts[entry["method"].split()[0]] += 1
        record_fidelity(model, entries)
        graph.sort()
        summary = {"replaced": len(entries), **{k: v for k, v in counts.items() if v}}
        if entries:
            summary["max_error_steps"] = round(max(e["max_steps"] for e in entries), 4)
        if skipped:
            summary["skipped"] = len(skipped)
        return summary

    def _replace(self, model: ir.Model, namer: Namer, region: Region, rng) -> dict | None:
        fn = get_function(region.function)
        anchor = next(n for n in region.nodes if n.op_type in ANCHORS)
        ops = [n.op_type for n in region.nodes]
        label = anchor.name or region.y.name
        b = Builder(model.graph, namer, label, f"{region.function} ({'/'.join(ops)}) '{label}'")
        params = dq_params(region.x) if self.lut8 and not self.quantize_input and region.scale is None else None
        x = region.x
        if region.scale is not None:  # f(a·x)/a per channel: the table reads a·x
            x = b.op("Mul", x, b.const("channel_scale", region.scale), suffix="scaled_input")
        if params is not None:  # the input is INT8 already: exact table on its codes
            scale, zp, qmin = params
            table = code_table(fn, scale, zp, qmin)
            y = emit_lut8(b, region.x, table, scale, zp, qmin)
            fid = code_fidelity(fn, table, scale, zp, qmin)
            method = "lut8"
        else:
            if rng is None or not (math.isfinite(rng.lo) and math.isfinite(rng.hi)) or rng.hi <= rng.lo:
                return None
            width = rng.hi - rng.lo
            lo, hi = rng.lo - self.margin * width, rng.hi + self.margin * width
            if self.quantize_input:
                scale, _ = activation_params(lo, hi, INT8, True)
                table = code_table(fn, scale, 0, -128)
                y = emit_lut8(b, b.qdq(x, scale), table, scale, 0, -128)
                fid = fidelity(lambda v: table[(np.clip(np.round(v / np.float32(scale)), -128, 127) + 128).astype(int)],
                               fn, lo, hi)
                method = "lut8 (input quantized here)"
            else:
                if self.table == "dulut":
                    lut = build_dulut(fn, lo, hi, tuple(self.entries))
                    method = f"dulut {self.entries[0]}+{self.entries[1]}"
                else:
                    lut = build_uniform(fn, lo, hi, self.entries[0])
                    method = f"uniform {self.entries[0]}"
                y = emit_dulut(b, x, lut)
                fid = fidelity(lut, fn, lo, hi)
        if region.scale is not None:
            y = b.op("Mul", y, b.const("channel_unscale", 1.0 / region.scale), suffix="unscaled")
            method += " (per-channel input scale)"
        b.finish(region.nodes[0], region.y, y, remove=region.nodes)
        region.y = y
        return {"pass": self.name, "node": label, "function": region.function, "replaced_ops": ops,
                "method": method, "range": [round(fid.lo, 6), round(fid.hi, 6)], "output_step": fid.step,
                "max_steps": round(fid.max_steps, 4), "mean_steps": round(fid.mean_steps, 4),
                "input_quantized": params is not None or self.quantize_input, "replacement": b.replaces}


def _input_ranges(model: ir.Model, regions: list[Region], data, show_progress: bool) -> dict[str, Range]:
    """Range of each region's input over the calibration set (keyed by the input's name), in one pass;
    for a per-channel-scaled region, the range of a·x (what its table reads)."""
    plain = Ranges(sorted({r.x.name for r in regions if r.scale is None}))
    scaled = Ranges(sorted({r.x.name for r in regions if r.scale is not None}),
                    scales={r.x.name: r.scale for r in regions if r.scale is not None})
    observe(model, data, plain, scaled, desc="dulut: input ranges", show_progress=show_progress)
    return {**plain.result, **scaled.result}


def code_table(fn: Function, scale: float, zero_point: int, qmin: int) -> np.ndarray:
    """T[i] = f((i + qmin - zero_point) · scale), i = 0..255: one entry per INT8/UINT8 code."""
    codes = np.arange(qmin, qmin + 256, dtype=np.float64)
    return fn((codes - zero_point) * np.float64(np.float32(scale))).astype(np.float32)


def code_fidelity(fn: Function, table: np.ndarray, scale: float, zero_point: int, qmin: int) -> Fidelity:
    """Error of the code table on the values the quantized input can take (float32 rounding only)."""
    xs = (np.arange(qmin, qmin + 256, dtype=np.float64) - zero_point) * np.float64(np.float32(scale))
    step = float(np.ptp(fn(xs))) / 255 or 1.0
    err = np.abs(table.astype(np.float64) - fn(xs)) / step
    return Fidelity(float(err.max()), float(err.mean()), step, float(xs[0]), float(xs[-1]))
