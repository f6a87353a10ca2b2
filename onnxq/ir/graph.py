"""Small helpers over the onnx_ir graph IR, shared by every pass.

onnx_ir is the one IR onnxq edits graphs with: Values carry their producer and consumers, so a
pass can walk and rewire the graph without index bookkeeping. These helpers cover what the passes
keep needing: constant arrays, fresh names derived from existing ones, initializers, attributes.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnx_ir as ir

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind `value` (initializer or Constant node), or None if it is computed."""
    if value is None:
        return None
    if value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_weight(value: ir.Value | None) -> bool:
    """True for a constant initializer that is not also a graph input (which a user could override)."""
    return value is not None and value.is_initializer() and not value.is_graph_input() and value.const_value is not None


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """Attribute `name` of `node` as a plain Python value, or `default` when absent."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def opset_version(model: ir.Model) -> int:
    return model.opset_imports.get("", model.graph.opset_imports.get("", 1))


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node reading `value`, or None when it has several readers or is a graph output."""
    users = value.consumers()
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0]


def iter_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Nodes of the main graph (a snapshot, so callers may edit the graph while iterating)."""
    return iter(list(graph))


class Namer:
    """Hands out names derived from existing ones that clash with nothing in the graph."""

    def __init__(self, graph: ir.Graph):
        self._taken: set[str] = set(graph.initializers)
        for value in graph.inputs:
            self._taken.add(value.name or "")
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self._taken.add(node.name)
            for value in node.outputs:
                if value.name:
                    self._taken.add(value.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name


def add_initializer(graph: ir.Graph, namer: Namer, base_name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named after `base_name` and return its Value."""
    name = namer.fresh(base_name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Give initializer `value` new contents, keeping its name and every reader."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def append_bias(graph: ir.Graph, namer: Namer, node: ir.Node, bias: ir.Value, result_name: str) -> ir.Node:
    """Insert Add(node's output, bias) after `node`; the Add's output, named `result_name`, takes over
    the output's readers and graph-output slot (the caller has renamed the node's own output)."""
    out = node.outputs[0]
    users = list(out.uses())
    add = ir.node("Add", [out, bias], name=namer.fresh(f"{node.name}_bias"))
    add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = result_name, out.dtype, out.shape
    graph.insert_after(node, add)
    for user, index in users:
        user.replace_input_with(index, add.outputs[0])
    for i, output in enumerate(graph.outputs):
        if output is out:
            graph.outputs[i] = add.outputs[0]
    return add


def private_weight(graph: ir.Graph, namer: Namer, node: ir.Node, index: int) -> ir.Value:
    """The weight at `node.inputs[index]`, copied first if other nodes share it, so it can be edited."""
    value = node.inputs[index]
    if len(value.uses()) > 1:
        copy = add_initializer(graph, namer, f"{value.name}_{node.name}", const_array(value).copy())
        node.replace_input_with(index, copy)
        return copy
    return value


_GENERIC = ("node", "_v_", "val_", "n_")


def _generic(name: str | None) -> bool:
    return not name or name.startswith(_GENERIC)


def name_anonymous(graph: ir.Graph) -> None:
    """Give nodes and tensors that library rewrites left with generic names (`node`, `_v_12`) names
    derived from their neighbours, so Netron shows where they belong."""
    namer = Namer(graph)
    for node in graph:
        reader = next((user for v in node.outputs for user in v.consumers()), None)
        anchor = node.outputs[0].name if node.outputs and not _generic(node.outputs[0].name) else (
            f"{reader.name}_{node.op_type.lower()}" if reader is not None and not _generic(reader.name) else None)
        if anchor is None:
            continue
        if _generic(node.name):
            node.name = namer.fresh(anchor if anchor != node.outputs[0].name else f"{anchor}_{node.op_type}")
        for i, value in enumerate(node.outputs):
            if _generic(value.name) and not value.is_graph_output():
                value.name = namer.fresh(f"{node.name}_output{i}" if i else f"{node.name}_output")
