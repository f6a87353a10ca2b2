"""Mixture-of-experts MLPs: a router, its top-k selection, and experts whose outputs are summed with
per-token gate weights.

Recognised in the dense form exporters write for a routed MLP that every runtime can execute: every
expert runs on every token and y = Σₑ gₑ·expertₑ(x), where gₑ (one value per token, shape [..., 1]) is
computed from the router's output and is zero for the experts a token was not routed to. The walk:

* match: a TopK whose input comes from a linear layer (the router) through at most a Softmax / Cast;
  the experts are the MLPs that read the router's input and whose down projection is multiplied by a
  tensor computed from the router's output (the gate), and the products are summed by an Add tree;
* check: every gate is computed from the router alone (it is reached from the router's output without
  another activation joining in), one value per token (last dimension 1), and the Add tree ends in
  one tensor (the MoE output) that nothing else feeds.

Sparse forms (gather tokens per expert, scatter back: data-dependent shapes) are not recognised: their
experts read gathered tensors, so no MLP reads the router's input and the router is recorded as a
rejection saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnxq.analysis.matching import Rejection, skip_casts_back
from onnxq.analysis.mlp import MLP
from onnxq.ir.graph import is_traced_const, traced_const
from onnxq.ir.linear import Linear

_ROUTER_TO_TOPK = ("Softmax", "Cast", "Identity", "Sigmoid")
_GATE_DEPTH = 16  # ops between the router's output and a gate (softmax, top-k mask, renormalise, slice)


@dataclass(eq=False)
class Expert:
    mlp: MLP
    gate: ir.Value  # the token's weight for this expert, [..., 1]; zero where the token is not routed here


@dataclass(eq=False)
class MoE:
    router: Linear
    experts: list[Expert]
    output: ir.Value  # Σ gates·expert outputs
    top_k: int | None

    @property
    def name(self) -> str:
        return self.router.name


def find_moes(linears: list[Linear], mlps: list[MLP], rejected: list[Rejection]) -> list[MoE]:
    """Every routed MoE MLP in the dense form (see the module docstring)."""
    by_output = {lin.output: lin for lin in linears}
    out = []
    for router, topk in _routers(by_output):
        moe, why = _moe_of(router, topk, mlps)
        if moe is None:
            rejected.append(Rejection("mixture of experts", router.name, why))
        else:
            out.append(moe)
    return out


def _routers(by_output: dict[ir.Value, Linear]) -> list[tuple[Linear, ir.Node]]:
    """(router linear, TopK) pairs: a TopK fed by a linear layer through softmax/casts only."""
    found = []
    seen = set()
    for value, lin in by_output.items():
        frontier = [value]
        for _ in range(3):
            topks = [u for v in frontier for u in v.consumers() if u.op_type == "TopK" and u.inputs[0] is v]
            if topks:
                if lin not in seen:
                    found.append((lin, topks[0]))
                    seen.add(lin)
                break
            frontier = [u.outputs[0] for v in frontier for u in v.consumers() if u.op_type in _ROUTER_TO_TOPK]
    return found


def _moe_of(router: Linear, topk: ir.Node, mlps: list[MLP]) -> tuple[MoE | None, str]:
    derived = _derived_from(router.output)
    source = skip_casts_back(router.input)
    experts = []
    for mlp in mlps:
        if skip_casts_back(mlp.up.input) is not source:
            continue
        for user in mlp.down.output.consumers():
            if user.op_type != "Mul" or len(user.inputs) != 2:
                continue
            gate = user.inputs[0] if user.inputs[1] is mlp.down.output else user.inputs[1]
            if gate in derived:
                experts.append((mlp, gate, user))
    if not experts:
        return None, "no MLP reading the router's input is multiplied by a gate computed from the router"
    for _, gate, _ in experts:
        last = gate.shape[-1] if gate.shape is not None and len(gate.shape) else None
        if isinstance(last, int) and last != 1:  # a symbolic or unknown last dimension is given the benefit
            return None, f"gate '{gate.name}' is not one value per token (shape {gate.shape})"
    total, why = _sum_of({mul.outputs[0] for _, _, mul in experts})
    if total is None:
        return None, why
    k = traced_const(topk.inputs[1]) if len(topk.inputs) > 1 else None
    return MoE(router, [Expert(mlp, gate) for mlp, gate, _ in experts], total,
               int(k.reshape(-1)[0]) if k is not None else None), ""


def _derived_from(value: ir.Value) -> set[ir.Value]:
    """Tensors computed from `value` and constants/shapes only, within _GATE_DEPTH ops."""
    derived, frontier = {value}, [value]
    for _ in range(_GATE_DEPTH):
        nxt = []
        for v in frontier:
            for node in v.consumers():
                if node.op_type == "MatMul":
                    continue
                own = all(i is None or i in derived or is_traced_const(i) or _is_shape(i) for i in node.inputs)
                if not own:
                    continue
                for out in node.outputs:
                    if out not in derived:
                        derived.add(out)
                        nxt.append(out)
        frontier = nxt
    return derived


def _is_shape(value: ir.Value) -> bool:
    """A tensor computed from shapes alone (Shape → Gather/Slice/Concat ...), as exporters write for zeros_like."""
    producer = value.producer()
    for _ in range(6):
        if producer is None:
            return False
        if producer.op_type == "Shape":
            return True
        if len(producer.inputs) != 1 and producer.op_type not in ("Gather", "Slice", "Concat", "Unsqueeze", "Expand"):
            return False
        producer = producer.inputs[0].producer() if producer.inputs and producer.inputs[0] is not None else None
    return False


def _sum_of(products: set[ir.Value]) -> tuple[ir.Value | None, str]:
    """The one tensor an Add tree over exactly `products` computes."""
    pending = set(products)
    while len(pending) > 1:
        step = next(((v, u) for v in pending for u in v.consumers() if u.op_type == "Add" and len(u.inputs) == 2
                     and all(i in pending for i in u.inputs) and u.inputs[0] is not u.inputs[1]), None)
        if step is None:
            return None, f"the {len(products)} gated expert outputs are not summed by Adds into one tensor"
        _, add = step
        pending -= set(add.inputs)
        pending.add(add.outputs[0])
    return pending.pop(), ""


def expert_gates(model: ir.Model) -> dict[str, str]:
    """Per node name of every linear layer inside an expert, the name of that expert's gate tensor: the
    per-token weights AGQ weighs the layer's statistics by.

    Read from the graph as the earlier passes left it (split_range may have cut a down projection into
    several MatMuls): an expert is everything between the router's input and a product gate·y, found by
    walking back from y; an expert whose walk reaches a graph input is left out."""
    from onnxq.analysis.linears import find_linears

    linears = find_linears(model.graph)
    weighted = {lin.node: lin for lin in linears}
    gates: dict[str, str] = {}
    for router, _ in _routers({lin.output: lin for lin in linears}):
        derived = _derived_from(router.output)
        for mul in {u for v in derived for u in v.consumers() if u.op_type == "Mul" and len(u.inputs) == 2}:
            inside = [i for i in mul.inputs if i not in derived]
            if len(inside) != 1 or is_traced_const(inside[0]):
                continue
            nodes = _cone(inside[0], stop=router.input)
            if nodes is not None:
                gate = next(i for i in mul.inputs if i in derived)
                gates.update({node.name: gate.name for node in nodes if node in weighted})
    return gates


def _cone(value: ir.Value, stop: ir.Value) -> set[ir.Node] | None:
    """The nodes computing `value` from `stop` and constants; None if the walk reaches a graph input."""
    nodes, pending = set(), [value]
    while pending:
        v = pending.pop()
        if v is stop or is_traced_const(v):
            continue
        producer = v.producer()
        if producer is None:
            return None
        if producer not in nodes:
            nodes.add(producer)
            pending += [i for i in producer.inputs if i is not None]
    return nodes
