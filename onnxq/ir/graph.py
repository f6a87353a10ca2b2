"""Small helpers over the onnx_ir graph IR, shared by every pass.

onnx_ir is the one IR onnxq edits graphs with: Values carry their producer and consumers, so a
pass can walk and rewire the graph without index bookkeeping. These helpers cover what the passes
keep needing: constant arrays, fresh names derived from existing ones, initializers, attributes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.ir.spill import place_if_spilling
from onnxq.metadata import SOURCE_NAME_KEY

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind `value` (initializer or Constant node), or None if it is computed."""
    tensor = const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind `value`, its data not read (a weight kept on disk stays there)."""
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


def is_const(value: ir.Value | None) -> bool:
    """Whether `value` is a constant, without reading its data."""
    return const_tensor(value) is not None


def traced_const(value: ir.Value | None) -> np.ndarray | None:
    """`const_array` that also looks through Identity nodes (the legacy exporter writes one for every
    initializer it de-duplicates; fold_constants removes them later)."""
    return const_array(_through_identities(value))


def traced_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """`const_tensor` through Identity nodes."""
    return const_tensor(_through_identities(value))


def is_traced_const(value: ir.Value | None) -> bool:
    return traced_tensor(value) is not None


def _through_identities(value: ir.Value | None) -> ir.Value | None:
    """The value behind up to 4 Identity nodes; None past that."""
    for _ in range(4):
        if value is None:
            return None
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return value
        value = producer.inputs[0]
    return None


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


class Namer:
    """Hands out names derived from existing ones that clash with nothing in the graph.

    onnx_ir's NameFixPass only names unnamed values and de-duplicates; passes need a fresh name
    derived from a base they choose (`<weight>_rotated`), which is what this does.
    """

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
    place_if_spilling(value)
    return value


def swap_initializer(graph: ir.Graph, namer: Namer, node: ir.Node, index: int, base_name: str,
                     array: np.ndarray) -> ir.Value:
    """Point `node.inputs[index]` at a new initializer holding `array`; the old one goes if nothing else
    reads it (it may be shared, so it is not edited in place)."""
    old = node.inputs[index]
    new = add_initializer(graph, namer, base_name, array)
    node.replace_input_with(index, new)
    if old is not None and not old.uses() and old.is_initializer() and not old.is_graph_input():
        graph.initializers.pop(old.name)
    return new


def replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Give initializer `value` new contents, keeping its name and every reader."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    place_if_spilling(value)


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
    derived from their neighbours, so Netron shows where they belong. (NameFixPass does not fit: it
    keeps any name already set, generic or not, and numbers the unnamed ones.)"""
    namer = Namer(graph)
    for node in graph:
        reader = next((user for v in node.outputs for user in v.consumers()), None)
        anchor = node.outputs[0].name if node.outputs and not _generic(node.outputs[0].name) else (
            f"{reader.name}_{node.op_type.lower()}" if reader is not None and not _generic(reader.name) else None)
        if anchor is None:
            continue
        if _generic(node.name):
            if node.name and SOURCE_NAME_KEY not in node.metadata_props:  # users name nodes as their model had them
                node.metadata_props[SOURCE_NAME_KEY] = node.name
            node.name = namer.fresh(anchor if anchor != node.outputs[0].name else f"{anchor}_{node.op_type}")
        for i, value in enumerate(node.outputs):
            if _generic(value.name) and not value.is_graph_output():
                value.name = namer.fresh(f"{node.name}_output{i}" if i else f"{node.name}_output")


def insert_elementwise(graph: ir.Graph, namer: Namer, value: ir.Value, op_type: str, constant: np.ndarray, base: str,
                       readers: list[tuple[ir.Node, int]] | None = None) -> ir.Node:
    """Insert `op_type`(value, constant) and move `readers` (default: all readers of `value`) onto its output."""
    readers = list(value.uses()) if readers is None else readers
    const = add_initializer(graph, namer, f"{base}_{op_type.lower()}_by", np.asarray(constant, dtype=np.float32))
    node = ir.node(op_type, [value, const], name=namer.fresh(f"{base}_{op_type}"))
    node.outputs[0].name = namer.fresh(f"{value.name}_{op_type.lower()}")
    node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
    for user, index in readers:
        user.replace_input_with(index, node.outputs[0])
    return node


def mark_changed(value: ir.Value | None, suffix: str, namer: Namer | None = None) -> None:
    """Append `suffix` to the name of a tensor whose values a pass changed (never a graph input or
    output, whose names are API), so a tensor name never stands for two different values."""
    if value is None or value.is_graph_output() or value.is_graph_input() or not value.name:
        return
    if not value.name.endswith(suffix):
        new = f"{value.name}{suffix}"
        value.name = namer.fresh(new) if namer is not None else new


def take_over_output(old: ir.Value, new: ir.Value, *, keep: ir.Node, rename: bool = True) -> None:
    """Move every reader of `old` except `keep` (the node computing `new` from it) onto `new`, graph
    output slot included; with `rename`, a graph output keeps its name (`new` takes it, `old` becomes
    `<name>_inner`)."""
    was_output, name = old.is_graph_output(), old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    for index, value in enumerate(keep.inputs):
        if value is new:
            keep.replace_input_with(index, old)
    if was_output and rename:
        old.name = f"{name}_inner"
        new.name = name
