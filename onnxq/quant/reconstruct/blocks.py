"""Blocks: sub-graphs whose weights are learned together against the block's float outputs.

A `Block` is a set of nodes of one graph, kept in graph (topological) order, with what crosses its
border: `inputs` are the non-constant values its nodes read but do not produce (activations captured
from the model, graph inputs included), `outputs` the values it produces that something outside reads
(another node or the graph's outputs), and `weights` the constant operands of its weighted ops
(Conv's kernel, Gemm's and MatMul's constant matrices) that rounding learns. Other constants (biases,
shapes, norm parameters) stay fixed. Cutting never edits the graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import const_array, is_const

LEARNED_OPS = frozenset({"Conv", "Gemm", "MatMul"})  # weighted ops whose constant operand is learned


@dataclass(frozen=True, eq=False)
class WeightSlot:
    """A learned weight: `node.inputs[index]` is the constant `value`."""

    node: ir.Node
    index: int
    value: ir.Value


@dataclass(eq=False)
class Block:
    nodes: list[ir.Node]
    inputs: list[ir.Value]
    outputs: list[ir.Value]
    weights: list[WeightSlot]

    @property
    def weight_values(self) -> list[ir.Value]:
        """Each learned weight once (a weight read by two nodes of the block is one tensor)."""
        return list({id(w.value): w.value for w in self.weights}.values())

    def __repr__(self) -> str:
        first, last = self.nodes[0].name, self.nodes[-1].name
        return (f"Block({len(self.nodes)} nodes '{first}'..'{last}', inputs {[v.name for v in self.inputs]}, "
                f"outputs {[v.name for v in self.outputs]}, {len(self.weight_values)} weights)")


def block_from_nodes(graph: ir.Graph, nodes: Iterable[ir.Node]) -> Block:
    """The block made of `nodes` (any order; they must belong to `graph`)."""
    chosen = set(nodes)
    if not chosen:
        raise OnnxqError("a block needs at least one node")
    ordered = [node for node in graph if node in chosen]
    if len(ordered) != len(chosen):
        raise OnnxqError("some of the block's nodes are not nodes of the graph")
    produced = {value for node in ordered for value in node.outputs}
    inputs: list[ir.Value] = []
    for node in ordered:
        for value in node.inputs:
            if value is not None and value not in produced and not is_const(value) and value not in inputs:
                inputs.append(value)
    outputs = [value for node in ordered for value in node.outputs
               if value.is_graph_output() or any(user not in chosen for user in value.consumers())]
    weights = [WeightSlot(node, index, node.inputs[index]) for node in ordered for index in _weight_indices(node)]
    return Block(ordered, inputs, outputs, weights)


def _weight_indices(node: ir.Node) -> list[int]:
    if node.op_type not in LEARNED_OPS or node.domain not in ("", "ai.onnx"):
        return []
    candidates = (1,) if node.op_type == "Conv" else (0, 1)
    found = []
    for index in candidates:
        value = node.inputs[index] if index < len(node.inputs) else None
        array = const_array(value)
        if array is not None and array.dtype.kind == "f" and array.ndim >= 2:
            found.append(index)
    return found


def block_of_range(graph: ir.Graph, start: int, stop: int) -> Block:
    """The nodes graph[start:stop] (graph order) as a block."""
    return block_from_nodes(graph, list(graph)[start:stop])


def block_between(graph: ir.Graph, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value]) -> Block:
    """Every node on which `outputs` depend, walking back until `inputs` or constants.

    A graph input reached on the way (an attention mask, say) becomes an extra input of the block; the
    block's outputs are then all its values read outside, which include `outputs`."""
    stop = set(inputs)
    nodes: set[ir.Node] = set()
    pending = [v for v in outputs]
    while pending:
        value = pending.pop()
        producer = value.producer()
        if value in stop or producer is None or producer in nodes or is_const(value):
            continue
        nodes.add(producer)
        pending.extend(v for v in producer.inputs if v is not None)
    if not nodes:
        raise OnnxqError(f"no node lies between {[v.name for v in inputs]} and {[v.name for v in outputs]}")
    return block_from_nodes(graph, nodes)


def _is_residual_add(node: ir.Node) -> bool:
    return node.op_type == "Add" and len(node.inputs) == 2 and all(
        v is not None and not is_const(v) for v in node.inputs)


def cnn_blocks(graph: ir.Graph, max_weighted: int = 4) -> list[Block]:
    """Blocks for a CNN, in graph order: each closes at a residual Add (of two activations), or before
    the weighted layer that would make it hold more than `max_weighted`; nodes before the first weighted
    layer join the first block, and a tail without weighted layers joins the last."""
    if max_weighted < 1:
        raise OnnxqError("max_weighted must be at least 1")
    groups: list[list[ir.Node]] = []
    current: list[ir.Node] = []
    count = 0
    for node in graph:
        weighted = bool(_weight_indices(node))
        if weighted and count == max_weighted:
            groups.append(current)
            current, count = [], 0
        current.append(node)
        count += weighted
        if _is_residual_add(node) and count:
            groups.append(current)
            current, count = [], 0
    if current:
        if count or not groups:
            groups.append(current)
        else:
            groups[-1].extend(current)
    return [block_from_nodes(graph, group) for group in groups if any(_weight_indices(n) for n in group)]


def transformer_blocks(model: ir.Model, max_weighted: int = 8, *, structure=None) -> list[Block]:
    """One block per encoder/decoder layer: the nodes between residual-stream tensors two Adds apart
    (attention Add, then MLP Add), as onnxq.analysis.structure finds the stream; nodes that several layers
    need (mask, positions) go with the first layer that needs them. Where no stream is
    found (or the layers do not come in Add pairs), falls back to `cnn_blocks` node ranges. `structure`:
    the model's onnxq.analysis.structure.analyse result, when the caller has it already."""
    from onnxq.analysis.structure import analyse

    stream = (structure or analyse(model)).stream
    graph = model.graph
    if stream is None or not stream.adds or len(stream.adds) % 2 or not stream.pre_norm:
        return cnn_blocks(graph, max_weighted)
    start = stream.values[0]
    blocks: list[Block] = []
    earlier: list[ir.Value] = []  # what earlier layers compute (a shared mask, RoPE tables) is an input here
    for k in range(0, len(stream.adds), 2):
        end = stream.adds[k + 1].outputs[0]
        blocks.append(block_between(graph, [start, *earlier], [end]))
        earlier.extend(v for node in blocks[-1].nodes for v in node.outputs)
        start = end
    return blocks
