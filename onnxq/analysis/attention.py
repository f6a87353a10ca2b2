"""Attention: a Softmax between the QKᵀ and PV MatMuls, fed by Q/K/V projections, with its output projection.

A graph walk rather than a pattern: the paths between a projection and the attention MatMuls (per-head
reshapes and transposes, RoPE, the GQA repeat, dynamic shapes) vary too much between exporters for a
fixed pattern. From each Softmax the walk finds the scores MatMul (through scaling, mask Adds and
Where), the PV MatMul, traces Q, K and V back through head-shaping ops to one projection each and the
attention output forward to the output projection; a candidate that fails a check is a `Rejection`.

Between the Softmax and the PV MatMul the walk crosses the NaN guard that exporters write for
`scaled_dot_product_attention`, Where(IsNaN(p), 0, p) (a fully masked row is 0, not NaN): a local
pattern, matched as an onnxscript `PatternBase` whose check wants the fill a constant zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

from onnxq.analysis.matching import (
    PASS_THROUGH,
    Rejection,
    data_readers,
    is_float_cast,
    last_dim,
    match_or_reason,
    scalar,
    skip_casts_forward,
    sole_reader,
)
from onnxq.analysis.norms import Norm
from onnxq.ir.graph import attr, is_traced_const, traced_const
from onnxq.ir.linear import Linear


@dataclass(eq=False)
class Attention:
    """Scaled dot-product attention with its projections."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear | None
    qk: ir.Node  # MatMul(Q, Kᵀ)
    softmax: ir.Node
    pv: ir.Node  # MatMul(P, V)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    v_path: list[ir.Node]  # nodes between v.output and pv's second input
    o_path: list[ir.Node]  # nodes between pv's output and o.input
    v_path_plain: bool  # only reshapes/transposes/expands: a per-head channel transform commutes with it

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The KV head a query head reads (HF repeat_kv: kv head g serves heads g·n_rep … g·n_rep+n_rep−1)."""
        return head // self.group_size



# ops an attention path may cross between a projection and the attention MatMuls
_HEAD_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Dropout", "Slice",
             "Concat", "Neg", "Mul", "Add", "Sub", "Div", "Split", "Tile"}
_PLAIN_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Dropout", "Tile"}
_DATA_ONLY = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Split", "Tile", "Cast", "Identity", "Dropout"}


def _trace_to_linears(value: ir.Value, by_output: dict[ir.Value, Linear], barriers: set[ir.Value],
                      limit: int = 64) -> tuple[set[Linear], list[ir.Node], str | None]:
    """Walk back from `value` through head-shaping ops to the linear layers that produce it."""
    found: set[Linear] = set()
    nodes: list[ir.Node] = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in by_output:
            found.add(by_output[v])
            continue
        if v in barriers:
            return found, nodes, f"reaches '{v.name}' (a norm output) without passing a projection"
        producer = v.producer()
        if producer is None or is_traced_const(v) or producer.op_type not in _HEAD_OPS:
            continue
        nodes.append(producer)
        if len(nodes) > limit:
            return found, nodes, "path longer than expected"
        inputs = producer.inputs[:1] if producer.op_type in _DATA_ONLY else producer.inputs
        stack.extend(i for i in inputs if i is not None and not is_traced_const(i))
    return found, nodes, None


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """The QKᵀ MatMul feeding `softmax`, through scaling (Mul/Div by a constant), mask Adds and Where."""
    v = softmax.inputs[0]
    for _ in range(8):
        p = v.producer()
        if p is None:
            return None
        if p.op_type == "MatMul":
            return p if all(not is_traced_const(i) for i in p.inputs) else None
        if p.op_type in ("Mul", "Div") and is_traced_const(p.inputs[1]):
            v = p.inputs[0]
        elif p.op_type == "Mul" and is_traced_const(p.inputs[0]):
            v = p.inputs[1]
        elif p.op_type == "Add":
            # the scores are the operand that is not the mask; the mask traces back to no MatMul
            a, b = p.inputs
            v = a if _reaches_matmul(a) else b
        elif p.op_type == "Where":
            v = p.inputs[2] if _reaches_matmul(p.inputs[2]) else p.inputs[1]
        elif is_float_cast(p) or p.op_type in PASS_THROUGH:
            v = p.inputs[0]
        else:
            return None
    return None


def _reaches_matmul(v: ir.Value | None, depth: int = 4) -> bool:
    for _ in range(depth):
        if v is None or v.producer() is None:
            return False
        p = v.producer()
        if p.op_type == "MatMul":
            return True
        v = p.inputs[0]
    return False


class NanGuard(pattern.PatternBase):
    """Where(IsNaN(p), 0, p), rooted at the Where: the softmax output with NaN rows zeroed."""

    def __init__(self):
        super().__init__(name="nan_guard")

    def pattern(self, op, p, fill):
        return op.Where(op.IsNaN(p), fill, p)

    def check(self, context, p, fill, **_) -> MatchResult:
        """The fill a constant zero: the guard then changes only NaN entries, which a softmax of finite
        scores never has, so the attention is the plain softmax·V the passes assume."""
        result = MatchResult()
        if scalar(fill) != 0.0:
            return result.fail("the NaN fill is not a constant zero")
        return result


_NAN_GUARD = NanGuard()


def skip_nan_guard(model: ir.Model, value: ir.Value, rejected: list[Rejection] | None = None) -> ir.Value:
    """The NaN guard's output when `value` is read only by Where(IsNaN(value), 0, value), else `value`."""
    readers = data_readers(value)
    where = next((u for u, _ in readers if u.op_type == "Where"), None)
    if where is None or len(readers) != 2 or value.is_graph_output():  # read by the IsNaN and the Where
        return value
    match, why = match_or_reason(_NAN_GUARD, model, where)
    if why is not None and rejected is not None:
        rejected.append(Rejection("NaN guard", where.name or "", why))
    if match is None or match.bindings["p"] is not value:
        return value
    is_nan = next(n for n in match.nodes if n.op_type == "IsNaN")
    if len(data_readers(is_nan.outputs[0])) != 1:
        return value
    return where.outputs[0]


def _pv_matmul(model: ir.Model, softmax: ir.Node, rejected: list[Rejection] | None = None) -> ir.Node | None:
    v = skip_casts_forward(skip_nan_guard(model, skip_casts_forward(softmax.outputs[0]), rejected))
    user = sole_reader(v)
    if user is not None and user.op_type == "MatMul" and user.inputs[0] is v and not is_traced_const(user.inputs[1]):
        return user
    return None


def _forward_to_linear(value: ir.Value, by_input: dict[ir.Value, list[Linear]]) -> tuple[Linear | None, list[ir.Node]]:
    nodes = []
    for _ in range(8):
        if value in by_input and len(by_input[value]) == 1 and len(data_readers(value)) == 1:
            return by_input[value][0], nodes
        user = sole_reader(value)
        if user is None or user.op_type not in ("Transpose", "Reshape", "Identity", "Cast", "Dropout"):
            return None, nodes
        nodes.append(user)
        value = user.outputs[0]
    return None, nodes


def _head_dim(qk: ir.Node, q_nodes: list[ir.Node]) -> int | None:
    d = last_dim(qk.inputs[0])
    if d:
        return d
    for node in q_nodes:
        if node.op_type == "Reshape":
            d = last_dim(node.outputs[0])
            if d:
                return d
            shape = traced_const(node.inputs[1])
            if shape is not None and shape.size >= 1 and shape.reshape(-1)[-1] > 0:
                return int(shape.reshape(-1)[-1])
            producer = node.inputs[1].producer()
            if producer is not None and producer.op_type == "Concat":
                last = traced_const(producer.inputs[-1])
                if last is not None and last.size == 1 and int(last.reshape(-1)[0]) > 0:
                    return int(last.reshape(-1)[0])
    return None


def find_attentions(model: ir.Model, linears: list[Linear], norms: list[Norm],
                    rejected: list[Rejection]) -> list[Attention]:
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    barriers = {n.output for n in norms}
    found = []
    for sm in model.graph:
        if sm.op_type != "Softmax":
            continue
        where = sm.name or ""
        qk = _scores_matmul(sm)
        pv = _pv_matmul(model, sm, rejected)
        if qk is None or pv is None:
            rejected.append(Rejection("attention", where, "Softmax is not between two activation MatMuls"))
            continue
        q_set, q_nodes, q_why = _trace_to_linears(qk.inputs[0], by_output, barriers)
        k_set, k_nodes, k_why = _trace_to_linears(qk.inputs[1], by_output, barriers)
        v_set, v_nodes, v_why = _trace_to_linears(pv.inputs[1], by_output, barriers)
        why = q_why or k_why or v_why
        if why or len(q_set) != 1 or len(k_set) != 1 or len(v_set) != 1:
            rejected.append(Rejection("attention", where, why or "Q, K and V do not each come from one projection "
                                      f"(found {len(q_set)}, {len(k_set)}, {len(v_set)})"))
            continue
        (q,), (k,), (v,) = q_set, k_set, v_set
        if len({q, k, v}) != 3:
            rejected.append(Rejection("attention", where, "Q, K and V share a fused projection (not split here)"))
            continue
        head_dim = _head_dim(qk, q_nodes)
        if not head_dim or q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features:
            rejected.append(Rejection("attention", where, f"head size unknown or inconsistent (head_dim={head_dim})"))
            continue
        o, o_nodes = _forward_to_linear(pv.outputs[0], by_input)
        if o is not None and o.in_features != q.out_features:
            o = None
        rope = any(n.op_type in ("Neg", "Concat") or (n.op_type == "Mul" and all(not is_traced_const(i) for i in n.inputs))
                   for n in q_nodes + k_nodes)
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if heads % kv_heads:
            rejected.append(Rejection("attention", where, f"{heads} query heads do not divide into {kv_heads} KV heads"))
            continue
        plain = all(n.op_type in _PLAIN_OPS for n in v_nodes) and all(
            last_dim(n.outputs[0]) in (None, head_dim) for n in v_nodes) and all(
            list(attr(n, "perm", [0]))[-1] == len(attr(n, "perm", [0])) - 1 for n in v_nodes if n.op_type == "Transpose")
        found.append(Attention(q, k, v, o, qk, sm, pv, heads, kv_heads, head_dim, rope, v_nodes[::-1], o_nodes, plain))
    return found


def find_softmaxes(model: ir.Model) -> list[ir.Node]:
    """Softmax nodes that sit in attention (between the QKᵀ and PV MatMuls)."""
    return [sm for sm in model.graph if sm.op_type == "Softmax" and _scores_matmul(sm) is not None
            and _pv_matmul(model, sm) is not None]
