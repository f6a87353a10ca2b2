"""Norms over the last axis: fused LayerNormalization / RMSNormalization / SimplifiedLayerNormalization
ops, and the decomposed forms exporters write, matched as onnxscript patterns.

Decomposed RMSNorm: x·(1/√(mean(x²) + ε)) with the square a Pow(·, 2) or Mul(x, x), and the inverse a
Div, a Reciprocal·Mul or a Div(1, ·)·Mul. Decomposed LayerNorm: the same on x − mean(x). Each form is
a `PatternBase` whose `check()` accepts only ε a small scalar, exponent 2, numerator 1 and means over
the last axis alone with keepdims; a failed check gives its reason, which becomes a `Rejection`.
The γ Mul and β Add that follow (through float Casts) are attached afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

from onnxq.analysis.matching import (
    Rejection,
    is_last_axis,
    last_dim,
    match_or_reason,
    reduce_axes,
    scalar,
    skip_casts_back,
    skip_casts_forward,
    sole_reader,
    vector_const,
)
from onnxq.ir.graph import attr, is_traced_const, traced_const

FUSED_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


@dataclass(eq=False)
class Norm:
    """A normalisation over the last axis: y = γ ⊙ normalize(x) + β (γ, β optional)."""

    kind: str  # "rms" | "layer"
    form: str  # the op type of a fused norm, or "decomposed"
    input: ir.Value
    output: ir.Value  # what readers read (after γ and β)
    nodes: list[ir.Node]
    epsilon: float
    normalized: ir.Value | None = None  # decomposed forms: the tensor before γ
    scale: ir.Value | None = None  # γ (constant), input 1 of a fused op or the Mul's constant
    bias: ir.Value | None = None  # β (constant)
    scale_node: ir.Node | None = None  # decomposed: the Mul by γ
    bias_node: ir.Node | None = None  # decomposed: the Add of β
    op: ir.Node | None = None  # fused op (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization)

    @property
    def name(self) -> str:
        return (self.op or self.nodes[-1]).name or ""

    @property
    def width(self) -> int | None:
        for v in (self.scale, self.bias):
            if v is not None and is_traced_const(v):
                return int(traced_const(v).size)
        shape = self.input.shape
        if shape is not None and len(shape) and isinstance(shape[-1], int):
            return int(shape[-1])
        return None

    def gamma(self) -> np.ndarray | None:
        return None if self.scale is None else traced_const(self.scale)

    def beta(self) -> np.ndarray | None:
        return None if self.bias is None else traced_const(self.bias)

    @property
    def has_affine(self) -> bool:
        g, b = self.gamma(), self.beta()
        return (g is not None and not np.all(g == 1)) or (b is not None and np.any(b != 0))


# ----------------------------------------------------------------------------------------------------
# decomposed forms as onnxscript patterns


def _mean(op, value, axes_var: str):
    return pattern.OrValue([op.ReduceMean(value, _allow_other_attributes=True),
                            op.ReduceMean(value, pattern.Var(axes_var), _allow_other_attributes=True)])


def _denominator(op, centred, eps, two, axes_var: str):
    """√(mean(centred²) + ε), the square as Pow(·, 2) or Mul(·, ·), ε on either side of the Add."""
    square = pattern.OrValue([op.Pow(centred, two), op.Mul(centred, centred)])
    mean = _mean(op, square, axes_var)
    return op.Sqrt(pattern.OrValue([op.Add(mean, eps), op.Add(eps, mean)]))


def _inverse(op, den, one):
    return pattern.OrValue([op.Reciprocal(den), op.Div(one, den)])


class DecomposedNorm(pattern.PatternBase):
    """One decomposed norm form, rooted at its last Mul or Div: kind "rms" (on x itself) or "layer"
    (on x − mean(x)); form "divided" (d / den), "times_inverse" (d · 1/den) or "inverse_times"."""

    def __init__(self, kind: str, form: str):
        super().__init__(name=f"{kind}:{form}")
        self.kind, self.form = kind, form

    def pattern(self, op, x, eps, two, one):
        d = op.Sub(x, _mean(op, x, "axes0")) if self.kind == "layer" else x
        den = _denominator(op, d, eps, two, "axes1" if self.kind == "layer" else "axes")
        if self.form == "divided":
            return op.Div(d, den)
        if self.form == "times_inverse":
            return op.Mul(d, _inverse(op, den, one))
        return op.Mul(_inverse(op, den, one), d)

    def check(self, context, x, eps, two, one, **_) -> MatchResult:
        """ε a small constant scalar, exponent 2, numerator 1, means over the last axis with keepdims."""
        result = MatchResult()
        eps_value = scalar(eps)
        if eps_value is None or not (0 <= eps_value < 1e-1):
            return result.fail("ε is not a small constant scalar")
        if two is not None and scalar(two) != 2.0:
            return result.fail("the square is a Pow with an exponent other than 2")
        if one is not None and scalar(one) != 1.0:
            return result.fail("Div(c, √·) with c ≠ 1")
        for node in context.nodes:
            if node.op_type == "ReduceMean":
                if not is_last_axis(reduce_axes(node), node.inputs[0]):
                    return result.fail("ReduceMean is not over the last axis alone")
                if attr(node, "keepdims", 1) != 1:
                    return result.fail("ReduceMean without keepdims")
        return result


_PATTERNS: dict[str, list[DecomposedNorm]] = {
    "rms": [DecomposedNorm("rms", f) for f in ("times_inverse", "inverse_times", "divided")],
    "layer": [DecomposedNorm("layer", f) for f in ("divided", "times_inverse")],
}


# ----------------------------------------------------------------------------------------------------
# recognition


def find_norms(model: ir.Model, rejected: list[Rejection] | None = None) -> list[Norm]:
    """Every LayerNorm and RMSNorm over the last axis, fused or decomposed."""
    graph = model.graph
    rejected = rejected if rejected is not None else []
    norms: list[Norm] = []
    claimed: set[ir.Node] = set()
    for node in graph:
        if node.op_type in FUSED_NORMS:
            norm = _fused_norm(node, rejected)
            if norm is not None:
                norms.append(norm)
            continue
        if node.op_type not in ("Mul", "Div") or node in claimed:
            continue
        for kind in ("layer", "rms"):
            norm = _match_decomposed(model, node, kind, rejected)
            if norm is not None:
                norms.append(norm)
                claimed.update(norm.nodes)
                break
    # a LayerNorm's Sub/ReduceMean also matches "rms" on the centred tensor: keep the layer form only
    layer_inputs = {id(n.normalized) for n in norms if n.kind == "layer"}
    return [n for n in norms if not (n.kind == "rms" and id(n.normalized) in layer_inputs)]


def _fused_norm(node: ir.Node, rejected: list[Rejection]) -> Norm | None:
    axis = attr(node, "axis", -1)
    x = node.inputs[0]
    if not (axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)):
        rejected.append(Rejection(node.op_type, node.name or "", f"normalises from axis {axis}, not the last axis alone"))
        return None
    if len(node.outputs) > 1 and any(o is not None and o.name and o.uses() for o in node.outputs[1:]):
        rejected.append(Rejection(node.op_type, node.name or "", "its mean/inv-std outputs are used"))
        return None
    kind = "layer" if node.op_type == "LayerNormalization" else "rms"
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if scale is not None and vector_const(scale) is None:
        rejected.append(Rejection(node.op_type, node.name or "", "γ is not a constant vector"))
        return None
    if bias is not None and vector_const(bias) is None:
        rejected.append(Rejection(node.op_type, node.name or "", "β is not a constant vector"))
        return None
    eps = float(attr(node, "epsilon", 1e-5))
    return Norm(kind, node.op_type, x, node.outputs[0], [node], eps, None, scale, bias, op=node)


def _match_decomposed(model: ir.Model, node: ir.Node, kind: str, rejected: list[Rejection]) -> Norm | None:
    for pat in _PATTERNS[kind]:
        match, why = match_or_reason(pat, model, node)
        if why is not None:
            rejected.append(Rejection(f"{kind} norm", node.name or "", why))
            return None
        if match is None:
            continue
        x_c = match.bindings["x"]
        nodes = list(match.nodes)
        x = skip_casts_back(x_c)
        if x is not x_c:
            nodes = [x_c.producer(), *nodes] if x_c.producer() is not None else nodes
        norm = Norm(kind, "decomposed", x, node.outputs[0], nodes, scalar(match.bindings["eps"]),
                    normalized=node.outputs[0])
        _affine_tail(norm)
        # a decomposed norm's interior must not leak to other readers
        inside = set(norm.nodes)
        for n in match.nodes:
            for out in n.outputs:
                if out is node.outputs[0]:
                    continue
                if any(u not in inside for u in out.consumers()):
                    rejected.append(Rejection(f"{kind} norm", node.name or "",
                                              f"intermediate '{out.name}' has readers outside the norm"))
                    return None
        return norm
    return None


def _affine_tail(norm: Norm) -> None:
    """Attach the γ Mul and β Add that follow a decomposed norm (through float Casts)."""
    tail = skip_casts_forward(norm.normalized)
    nodes = []
    user = sole_reader(tail)
    width = last_dim(norm.input)
    for op_type, role in (("Mul", "scale"), ("Add", "bias")):  # γ first, then β, each optional
        if user is None or user.op_type != op_type or len(user.inputs) != 2:
            continue
        other = user.inputs[1] if user.inputs[0] is tail else user.inputs[0]
        if other is not tail and vector_const(other, width) is not None:
            setattr(norm, role, other)
            setattr(norm, f"{role}_node", user)
            nodes.append(user)
            tail = user.outputs[0]
            user = sole_reader(tail)
    norm.output = tail
    norm.nodes.extend(nodes)
