"""Linear layers: every MatMul/Gemm with a constant 2-D weight, with its bias when there is one."""

from __future__ import annotations

import onnx_ir as ir

from onnxq.analysis.matching import sole_reader, vector_const
from onnxq.ir.graph import attr, is_traced_const, traced_const, traced_tensor
from onnxq.ir.linear import Linear


def weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(weight value, transposed) when `node` is a MatMul/Gemm with a constant 2-D weight."""
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        w = node.inputs[1]
        a = traced_tensor(w)  # shape only: a weight kept on disk is not read
        if a is not None and len(a.shape) == 2 and not is_traced_const(node.inputs[0]):
            return w, False
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return None
        w = node.inputs[1]
        a = traced_tensor(w)
        if a is not None and len(a.shape) == 2 and not is_traced_const(node.inputs[0]):
            return w, bool(attr(node, "transB", 0))
    return None


def linear_at(node: ir.Node) -> Linear | None:
    """`node` as a linear layer (see `weight_of`), with the bias: Gemm's C when it is a plain vector, or
    the Add of a 1-D constant of out_features that alone reads a MatMul. A Gemm whose C is anything
    else is not a layer the passes can edit: None."""
    found = weight_of(node)
    if found is None:
        return None
    weight, transposed = found
    lin = Linear(node, weight, transposed=transposed)
    out_features = lin.out_features
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if vector_const(node.inputs[2], out_features) is not None and traced_const(node.inputs[2]).ndim == 1:
            lin.bias = node.inputs[2]
            return lin
        return None
    user = sole_reader(node.outputs[0])
    if user is not None and user.op_type == "Add" and len(user.inputs) == 2:
        other = user.inputs[1] if user.inputs[0] is node.outputs[0] else user.inputs[0]
        b = traced_const(other)
        if b is not None and b.ndim == 1 and b.shape[0] == out_features:
            lin.bias, lin.bias_node = other, user
    return lin


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every linear layer of the main graph, in graph order."""
    return [lin for node in graph if (lin := linear_at(node)) is not None]
