"""The one model of a linear layer, y = x·W (+ b), and the edits passes make to its weight and bias.

A `Linear` is a MatMul with a constant 2-D weight [in, out], or a Gemm (weight [out, in] with
transB), optionally followed by the Add of a constant bias that alone reads it (Gemm: its input C).
`onnxq.analysis.linears` finds them; passes read `weight_io()` / `bias_array()` in the [in, out]
convention and write back through `set_weight_io` / `set_bias`, which keep the layer's layout, copy
a weight that other nodes share before editing it, and add a bias Add where the layer had none.
`dequantized_weight` reads the weight the runtime multiplies once `quantize` has put a
DequantizeLinear in front of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import (
    Namer,
    add_initializer,
    attr,
    const_array,
    is_const,
    private_weight,
    replace_initializer,
    take_over_output,
    traced_const,
)


@dataclass(eq=False)
class Linear:
    """y = x·W (+ b): MatMul with a constant [in, out] weight, or Gemm (weight [out, in] when transB).

    A Conv may stand here too where a pass edits only its bias (recentre); the [in, out] accessors
    are for MatMul and Gemm."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None  # the Add carrying the bias, when it is not Gemm's C
    transposed: bool = False

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.bias_node.outputs[0] if self.bias_node is not None else self.node.outputs[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        shape = tuple(traced_const(self.weight).shape) if self.weight.shape is None else tuple(self.weight.shape)
        return (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    @property
    def in_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[1])

    @property
    def bias_index(self) -> int | None:
        """Which input of its owner (the bias Add, or the Gemm) the bias is."""
        if self.bias is None:
            return None
        return 2 if self.bias_node is None else list(self.bias_node.inputs).index(self.bias)

    def weight_io(self) -> np.ndarray:
        """The weight as an [in, out] array (a copy for Gemm with transB)."""
        w = traced_const(self.weight)
        return w.T if self.transposed else w

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else traced_const(self.bias)


def set_weight_io(graph: ir.Graph, namer: Namer, lin: Linear, w_io: np.ndarray) -> None:
    """Store `w_io` ([in, out]) as `lin`'s weight, in its layout; a weight other nodes share is copied."""
    value = private_weight(graph, namer, lin.node, 1)
    lin.weight = value
    w = np.asarray(w_io, dtype=np.float32)
    replace_initializer(value, np.ascontiguousarray(w.T if lin.transposed else w))


def set_bias(graph: ir.Graph, namer: Namer, lin: Linear, b: np.ndarray) -> None:
    """Give `lin` the bias `b`: edit the existing one in place (copied if shared), or add an Add after
    the layer (initializer `<layer>_bias`, output `<output>_biased`; a graph output keeps its name)."""
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    if lin.bias is not None:
        owner = lin.node if lin.bias_node is None else lin.bias_node
        value = private_weight(graph, namer, owner, lin.bias_index)
        lin.bias = value
        replace_initializer(value, b)
        return
    out = lin.node.outputs[0]
    base = lin.node.name or out.name or "linear"
    bias = add_initializer(graph, namer, f"{base}_bias", b)
    add = ir.node("Add", [out, bias], name=namer.fresh(f"{base}_bias_add"))
    add.outputs[0].name = namer.fresh(f"{out.name}_biased")
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(lin.node, add)
    take_over_output(out, add.outputs[0], keep=add)
    lin.bias, lin.bias_node = bias, add


def replace_bias(graph: ir.Graph, namer: Namer, lin: Linear, b: np.ndarray, name: str,
                 unbiased_name: str | None = None, dtype=np.float32) -> None:
    """Give `lin` the bias `b` as a new initializer named after `name` (the old bias stays for its other
    readers). A layer without one gets it as Gemm's/Conv's C, or through an Add after the MatMul, whose
    output takes the layer output's name while the MatMul's output is renamed `unbiased_name`
    (default `<output>_unbiased`). The bias is stored as `dtype` (the layer's float type)."""
    value = add_initializer(graph, namer, name, np.asarray(b, dtype=dtype))
    if lin.bias is not None:
        owner = lin.node if lin.bias_node is None else lin.bias_node
        owner.replace_input_with(lin.bias_index, value)
        lin.bias = value
        return
    if lin.node.op_type in ("Conv", "Gemm"):
        lin.node.resize_inputs(3)
        lin.node.replace_input_with(2, value)
        lin.bias = value
        return
    out = lin.node.outputs[0]
    result_name, out.name = out.name, namer.fresh(unbiased_name or f"{out.name}_unbiased")
    lin.bias_node = append_bias(graph, namer, lin.node, value, result_name)
    lin.bias = value


def append_bias(graph: ir.Graph, namer: Namer, node: ir.Node, bias: ir.Value, result_name: str) -> ir.Node:
    """Insert Add(node's output, bias) after `node`; the Add's output, named `result_name`, takes over
    the output's readers and graph-output slot (the caller has renamed the node's own output)."""
    out = node.outputs[0]
    add = ir.node("Add", [out, bias], name=namer.fresh(f"{node.name}_bias"))
    add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = result_name, out.dtype, out.shape
    graph.insert_after(node, add)
    take_over_output(out, add.outputs[0], keep=add, rename=False)
    return add


def is_weight(value: ir.Value | None) -> bool:
    """A constant, or the DQ of a constant (stored quantized, or quantized by a Q of a constant)."""
    if value is None:
        return False
    if is_const(value):
        return True
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    q = dq.inputs[0].producer()
    return is_const(dq.inputs[0]) or (q is not None and q.op_type == "QuantizeLinear" and is_const(q.inputs[0]))


def dequantized_weight(value: ir.Value) -> np.ndarray | None:
    """The weight the runtime multiplies: a constant, or a per-tensor/per-axis DequantizeLinear of one
    (float64). None for a computed or block-quantized weight."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return const_array(value)
    codes, scale = const_array(dq.inputs[0]), const_array(dq.inputs[1])
    zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if codes is None or scale is None or attr(dq, "block_size", 0):
        return None
    shape = [1] * codes.ndim
    shape[attr(dq, "axis", 1)] = -1  # per-axis scale and zero point broadcast along that axis
    zero = np.zeros(1) if zero is None else zero.astype(np.float64)
    return (codes.astype(np.float64) - zero.reshape(shape if zero.size > 1 else ())) \
        * scale.astype(np.float64).reshape(shape if scale.size > 1 else ())


def fold_input_addend(graph: ir.Graph, namer: Namer, lin: Linear, x: ir.Value, addend: np.ndarray,
                      tag: str = "position_folded") -> np.ndarray:
    """Make `lin` read `x` instead of x + addend, with bias addend·W + b (float64, rounded once); returns
    that bias. The MatMul's output (now x·W) is renamed `<name>_<tag>`; the layer's result keeps its name
    and value. The new bias is an initializer `<old bias or <layer>_bias>_<tag>`."""
    bias = lin.bias_array().astype(np.float64) if lin.bias is not None else 0.0
    c = (addend.astype(np.float64) @ lin.weight_io().astype(np.float64) + bias).astype(np.float32)
    base = lin.bias.name if lin.bias is not None else f"{lin.node.name}_bias"
    lin.node.replace_input_with(0, x)
    out = lin.node.outputs[0]
    if lin.bias is not None:
        replace_bias(graph, namer, lin, c, f"{base}_{tag}")
        out.name = namer.fresh(f"{out.name}_{tag}")
    else:  # a new Add takes the layer output's name
        replace_bias(graph, namer, lin, c, f"{base}_{tag}", f"{out.name}_{tag}")
    return c
