"""Folding a norm's γ/β into the linear layers that read it (used by fold_norm, rotate and klt_rotate).

A norm writes y = γ ⊙ x̂ + β and every reader computes y·W + b. Since
(γ ⊙ x̂ + β)·W + b = x̂·(diag(γ)·W) + (β·W + b), each reader gets W ← diag(γ)·W and b ← β·W + b (a
bias Add is created if the reader has none), and the norm then writes x̂ alone: the γ Mul / β Add of
a decomposed norm are removed, a fused op gets γ = 1 and β = 0. Products are computed in float64
and rounded once to float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer, add_initializer, mark_changed
from onnxq.ir.linear import set_bias, set_weight_io


def linear_readers(s: st.Structure, norm: st.Norm) -> tuple[list[st.Linear], str | None]:
    """The linear layers reading `norm`'s output, or a reason why its γ/β cannot be folded into them."""
    if norm.output.is_graph_output():
        return [], "its output is a graph output"
    readers = []
    for node, index in norm.output.uses():
        if node.op_type in ("Shape", "Size"):
            continue
        lin = s.linear_at(node)
        if lin is None or index != 0:
            return [], f"its output is also read by {node.op_type} (post-norm residual or other non-linear reader)"
        readers.append(lin)
    if not readers:
        return [], "nothing reads it"
    return readers, None


def fold(graph: ir.Graph, namer: Namer, norm: st.Norm, readers: list[st.Linear]) -> None:
    """Move γ/β of `norm` into `readers` (all its readers) and strip them from the norm."""
    gamma = norm.gamma()
    beta = norm.beta()
    width = readers[0].in_features
    g = np.ones(width) if gamma is None else np.broadcast_to(gamma.astype(np.float64).reshape(-1), (width,))
    for lin in readers:
        w = lin.weight_io().astype(np.float64)
        if beta is not None and np.any(beta != 0):
            b0 = lin.bias_array()
            shift = beta.astype(np.float64).reshape(-1) @ w
            set_bias(graph, namer, lin, shift if b0 is None else b0.astype(np.float64) + shift)
        set_weight_io(graph, namer, lin, g[:, None] * w)
    strip_affine(graph, namer, norm)


def strip_affine(graph: ir.Graph, namer: Namer, norm: st.Norm) -> None:
    """Make `norm` write x̂ (γ = 1, β = 0); readers now read the bare normalised tensor."""
    if norm.op is not None:
        node = norm.op
        width = norm.width
        if norm.scale is not None:
            ones = add_initializer(graph, namer, f"{norm.name}_unit_scale", np.ones(width, np.float32))
            node.replace_input_with(1, ones)
            norm.scale = ones
        if norm.bias is not None:
            zeros = add_initializer(graph, namer, f"{norm.name}_zero_bias", np.zeros(width, np.float32))
            node.replace_input_with(2, zeros)
            norm.bias = zeros
        mark_changed(norm.output, "_normalized", namer)
        return
    first = norm.scale_node or norm.bias_node
    if first is None:
        return
    bare = first.inputs[0] if first.inputs[1] is norm.scale or first.inputs[1] is norm.bias else first.inputs[1]
    out = norm.output
    for node, index in list(out.uses()):
        node.replace_input_with(index, bare)
    norm.nodes = [n for n in norm.nodes if n is not norm.scale_node and n is not norm.bias_node]
    norm.scale = norm.bias = norm.scale_node = norm.bias_node = None
    norm.output = bare
