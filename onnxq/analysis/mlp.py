"""MLPs: SwiGLU (SiLU(gate)·up → down), GeGLU, or a plain activation MLP (GELU, ReLU, SiLU).

The Erf form of GELU, 0.5·x·(1 + erf(x/√2)) in the orders exporters write, is an onnxscript
`PatternBase` whose `check()` accepts ½ and 1 as constants and the divisor inside erf as √2 (a Div)
or 1/√2 (a Mul), or a positive per-channel vector there (S-GELU, what `smooth` leaves behind).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

from onnxq.analysis.matching import Rejection, match_or_reason, scalar, vector_const
from onnxq.ir.graph import attr, is_traced_const
from onnxq.ir.linear import Linear


@dataclass(eq=False)
class MLP:
    kind: str  # "swiglu" | "geglu" | "gelu" | "relu" | "silu"
    up: Linear
    down: Linear
    gate: Linear | None = None
    product: ir.Node | None = None  # gated: Mul(act(gate), up)
    act_nodes: list[ir.Node] = field(default_factory=list)
    gelu_divisor: ir.Node | None = None  # Erf-form GELU: the Div(x, √2) (or Mul(x, 1/√2)) inside Erf


def silu_input(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """x when value = x·Sigmoid(x) (either order) or Swish(x)."""
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Swish" and attr(p, "alpha", 1.0) == 1.0:
        return p.inputs[0], [p]
    if p.op_type == "Mul" and len(p.inputs) == 2:
        for x, s in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
            sp = s.producer()
            if sp is not None and sp.op_type == "Sigmoid" and sp.inputs[0] is x:
                return x, [sp, p]
    return None


def _erf_divisor(nodes) -> ir.Node | None:
    """The Div or Mul whose output Erf reads."""
    return next((n for n in nodes if n.op_type in ("Div", "Mul") and n.outputs[0].consumers()
                 and n.outputs[0].consumers()[0].op_type == "Erf"), None)


class ErfGelu(pattern.PatternBase):
    """0.5·x·(1 + erf(x/√2)) rooted at its last Mul; `order` says where the ½ multiplies:
    "half_last" ((x·(1 + erf))·½), "half_first" ((x·½)·(1 + erf)) or "half_inner" (x·((1 + erf)·½)) or "half_inner_x" (((1 + erf)·½)·x)."""

    def __init__(self, order: str):
        super().__init__(name=f"gelu:{order}")
        self.order = order

    def pattern(self, op, x, root2, one, half):
        erf = op.Erf(pattern.OrValue([op.Div(x, root2), op.Mul(x, root2)], tag_var="divisor"))
        plus = pattern.OrValue([op.Add(erf, one), op.Add(one, erf)])
        if self.order == "half_last":
            return op.Mul(pattern.OrValue([op.Mul(x, plus), op.Mul(plus, x)]), half)
        if self.order == "half_first":
            return op.Mul(pattern.OrValue([op.Mul(x, half), op.Mul(half, x)]), plus)
        inner = pattern.OrValue([op.Mul(plus, half), op.Mul(half, plus)])
        return op.Mul(x, inner) if self.order == "half_inner" else op.Mul(inner, x)

    def check(self, context, x, root2, one, half, **_) -> MatchResult:
        """½ and 1 exactly; the erf divisor √2 (Div), 1/√2 (Mul), or a positive per-channel vector."""
        result = MatchResult()
        half_value, one_value, root2_value = scalar(half), scalar(one), scalar(root2)
        if half_value is None or one_value != 1.0 or not math.isclose(half_value, 0.5, rel_tol=1e-6):
            return result.fail("the constants are not ½ and 1")
        divisor = _erf_divisor(context.nodes)
        if divisor is None:
            return result.fail("no Div or Mul feeds the Erf")
        if root2_value is None:  # S-GELU (after smooth): a per-channel divisor √2/s inside erf
            vector = vector_const(root2)
            if vector is None or not np.all(vector > 0):
                return result.fail("the erf divisor is neither a scalar nor a positive vector")
            return result
        if divisor.op_type == "Div" and math.isclose(root2_value, math.sqrt(2), rel_tol=1e-5):
            return result
        if divisor.op_type == "Mul" and math.isclose(root2_value, 1 / math.sqrt(2), rel_tol=1e-5):
            return result
        return result.fail("the erf divisor is not √2")


_GELU_PATTERNS = [ErfGelu(order) for order in ("half_last", "half_first", "half_inner", "half_inner_x")]


def _gelu_input(model: ir.Model, value: ir.Value) -> tuple[ir.Value, list[ir.Node], ir.Node | None] | None:
    """x when value = GELU(x): the Gelu op, or the Erf form 0.5·x·(1 + erf(x/√2)) in its usual orders."""
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Gelu":
        return p.inputs[0], [p], None
    if p.op_type != "Mul":
        return None
    for pat in _GELU_PATTERNS:
        match, _ = match_or_reason(pat, model, p)
        if match:
            return match.bindings["x"], list(match.nodes), _erf_divisor(match.nodes)
    return None


def _gated(model: ir.Model, p: ir.Node, down: Linear, by_output: dict[ir.Value, Linear],
           rejected: list[Rejection]) -> MLP | None:
    """The SwiGLU/GeGLU MLP whose product act(gate)·up is `p`, or None."""
    for g_val, u_val in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
        up = by_output.get(u_val)
        if up is None:
            continue
        silu = silu_input(g_val)
        gelu = None if silu is not None else _gelu_input(model, g_val)
        act = silu or (gelu[:2] if gelu else None)
        if act is None or act[0] not in by_output:
            continue
        gate = by_output[act[0]]
        if gate.input is not up.input:
            rejected.append(Rejection("gated MLP", p.name or "", "gate and up read different inputs"))
            return None
        return MLP("swiglu" if silu else "geglu", up, down, gate, p, act[1])
    return None


def find_mlps(model: ir.Model, linears: list[Linear], rejected: list[Rejection]) -> list[MLP]:
    by_output = {lin.output: lin for lin in linears}
    out = []
    for down in linears:
        a = down.input
        p = a.producer()
        if p is None:
            continue
        if p.op_type == "Mul" and len(p.inputs) == 2 and all(not is_traced_const(i) for i in p.inputs):
            gated = _gated(model, p, down, by_output, rejected)
            if gated is not None:
                out.append(gated)
                continue
            # not gated: a product of two activations is also how x·Sigmoid(x) and x·(½(1 + erf)) end
        silu = silu_input(a)
        if silu is not None and silu[0] in by_output:
            out.append(MLP("silu", by_output[silu[0]], down, act_nodes=silu[1]))
            continue
        gelu = _gelu_input(model, a)
        if gelu is not None and gelu[0] in by_output:
            out.append(MLP("gelu", by_output[gelu[0]], down, act_nodes=gelu[1], gelu_divisor=gelu[2]))
            continue
        if p.op_type == "Relu" and p.inputs[0] in by_output:
            out.append(MLP("relu", by_output[p.inputs[0]], down, act_nodes=[p]))
    return out
