"""fold_norm: fold each norm's scale γ and shift β into the linear layers that read it.

Kind: exact. A norm writes y = γ ⊙ x̂ + β (x̂ = the normalised input) and every reader computes
y·W + b. Since (γ ⊙ x̂ + β)·W + b = x̂·(diag(γ)·W) + (β·W + b), each reader gets W ← diag(γ)·W and
b ← β·W + b (a bias Add is created if the reader has none), and the norm then writes x̂ alone: the
γ Mul / β Add of a decomposed norm are removed, a fused op gets γ = 1 and β = 0. The products are
computed in float64 and rounded once to float32.

Only norms whose readers are all linear layers qualify. A post-norm LayerNorm (BERT) also feeds the
residual Add, where γ/β are part of the stream itself: it is left alone and the summary says why.
A γ-free RMSNorm is what the residual rotation needs: RMSNorm(x·R) = RMSNorm(x)·R for orthogonal R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer, add_initializer
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize


@dataclass(frozen=True)
class FoldNorm(GraphPass):
    name: ClassVar[str] = "fold_norm"
    kind: ClassVar[Kind] = Kind.EXACT

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        s = st.analyse(model)
        namer = Namer(model.graph)
        folded, kept = 0, {}
        for norm in s.norms:
            if not norm.has_affine and norm.scale_node is None and norm.bias_node is None:
                continue
            readers, why = linear_readers(s, norm)
            if why:
                kept[norm.name] = why
                continue
            fold(model.graph, namer, norm, readers)
            folded += 1
        summary = {"folded": folded, "kept": len(kept)}
        if kept:
            reasons = sorted(set(kept.values()))
            summary["kept_because"] = reasons[:3]
            ctx.log(f"fold_norm: {len(kept)} norm(s) keep their γ/β: {reasons[0]}")
        return summary


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
            st.set_bias(graph, namer, lin, shift if b0 is None else b0.astype(np.float64) + shift)
        st.set_weight_io(graph, namer, lin, g[:, None] * w)
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
        st.rename(norm.output, "_normalized", namer)
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
