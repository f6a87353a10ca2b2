"""Helpers the recognisers share: constants behind Identity nodes, data readers, float casts, axes.

Recognition never edits the graph; a candidate that matched but failed a check is kept as a
`Rejection` with the reason, so `onnxq inspect` and the pass summaries can say why a site was left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchingTracer, MatchStatus

from onnxq.ir.graph import attr, traced_const

FLOAT_CASTS = {int(ir.DataType.FLOAT), int(ir.DataType.FLOAT16), int(ir.DataType.BFLOAT16), int(ir.DataType.DOUBLE)}
SHAPE_ONLY = ("Shape", "Size")  # readers that see only a tensor's shape, never its values
PASS_THROUGH = ("Identity", "Dropout")  # no-ops in inference


@dataclass(frozen=True)
class Rejection:
    """A candidate that matched but failed a check, and why."""

    what: str
    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.what} at '{self.where}': {self.why}"


def scalar(value: ir.Value | None) -> float | None:
    a = traced_const(value)
    if a is None or a.size != 1:
        return None
    return float(a.reshape(()))


def is_float_cast(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Cast" and attr(node, "to") in FLOAT_CASTS


def skip_casts_back(value: ir.Value) -> ir.Value:
    """The tensor before any float→float Casts / Identities that produced `value`."""
    while value.producer() is not None and (is_float_cast(value.producer()) or value.producer().op_type in PASS_THROUGH):
        value = value.producer().inputs[0]
    return value


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The single node that reads `value`'s data (Shape readers ignored), None if several or an output."""
    users = [u for u in value.consumers() if u.op_type not in SHAPE_ONLY]
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0]


def skip_casts_forward(value: ir.Value) -> ir.Value:
    while True:
        user = sole_reader(value)
        if user is None or not (is_float_cast(user) or user.op_type in PASS_THROUGH):
            return value
        value = user.outputs[0]


def data_readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    return [(n, i) for n, i in value.uses() if n.op_type not in SHAPE_ONLY]


def cast_aliases(value: ir.Value) -> list[ir.Value]:
    """`value` and the outputs of the float→float Casts / Identities that read it (recursively)."""
    out, i = [value], 0
    while i < len(out):
        for user in out[i].consumers():
            if (is_float_cast(user) or user.op_type in PASS_THROUGH) and user.outputs[0] not in out:
                out.append(user.outputs[0])
        i += 1
    return out


def vector_const(value: ir.Value | None, width: int | None = None) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only (shape [..., 1, d] or [d])."""
    a = traced_const(value)
    if a is None or a.ndim == 0:
        return None
    if any(d != 1 for d in a.shape[:-1]):
        return None
    if width is not None and a.shape[-1] != width:
        return None
    return a.reshape(-1)


def last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or not len(value.shape):
        return None
    d = value.shape[-1]
    return int(d) if isinstance(d, int) else None


def reduce_axes(node: ir.Node) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        a = traced_const(node.inputs[1])
        axes = None if a is None else a.reshape(-1).tolist()
    return None if axes is None else [int(x) for x in axes]


def is_last_axis(axes: list[int] | None, value: ir.Value) -> bool:
    if axes is None or len(axes) != 1:
        return False
    if axes[0] == -1:
        return True
    rank = len(value.shape) if value.shape is not None else None
    return rank is not None and axes[0] == rank - 1


def match_or_reason(pattern, model: ir.Model, node: ir.Node):
    """(match, None) when the onnxscript `pattern` matches at `node` and its check passes; (None, reason)
    when the subgraph matches but the check fails (the reason its check gave); (None, None) otherwise."""
    tracer = MatchingTracer()
    match = pattern.match(model, model.graph, node, check_nodes_are_removable=False, tracer=tracer)
    if match:
        return match, None
    for infos in tracer.best_matches_map.values():
        for info in infos:
            if info.status == MatchStatus.CONDITION_FAILED:
                return None, info.match_result.reason or "check failed"
    return None, None
