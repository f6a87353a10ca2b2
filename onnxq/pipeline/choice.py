"""Which built-in recipe runs when the user names none, and why (one line, recorded in the model).

A model gets the transformer recipe only when recognised transformer blocks (attention with its
projections, MLPs) carry most of the compute of the weighted layers: one attention block in a CNN
(a text recogniser's neck, say) leaves the CNN recipe in charge. Compute is counted in FLOPs on a
copy of the graph whose inputs take the first calibration batch's shapes, so symbolic dimensions
(sequence length, image width) count at their real size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxq.analysis.inspection import node_flops
from onnxq.analysis.structure import analyse

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
TRANSFORMER_SHARE = 0.5  # transformer blocks must carry at least this share of the weighted FLOPs


@dataclass(frozen=True)
class RecipeChoice:
    recipe: str
    reason: str


def choose_recipe(model: ir.Model, sample: dict[str, np.ndarray] | None = None) -> RecipeChoice:
    """The built-in recipe for `model` (read-only): transformer-w8a8, mamba-w8a8, rwkv-w8a8 or default,
    with the reason."""
    ops = {node.op_type for node in model.graph}
    if not {"Softmax", "Sigmoid"} & ops:  # no attention, no gate: nothing to recognise
        return RecipeChoice("default", "no attention (no Softmax in the graph)")
    structure = analyse(model)
    recurrent = _recurrent_choice(structure)
    if recurrent is not None:
        return recurrent
    if "Softmax" not in ops:
        return RecipeChoice("default", "no attention (no Softmax in the graph)")
    if not structure.is_transformer:
        return RecipeChoice("default", "a Softmax but no attention block with a norm recognised")
    share = _transformer_share(model, structure, sample)
    blocks = f"{len(structure.attentions)} attention block(s), {len(structure.mlps)} MLP(s)"
    if share >= TRANSFORMER_SHARE:
        return RecipeChoice("transformer-w8a8", f"transformer: {blocks} carry {share:.0%} of the weighted-layer FLOPs")
    return RecipeChoice("default", f"{blocks} recognised, but they carry only {share:.0%} of the weighted-layer "
                                   "FLOPs: quantized as a CNN")


def _recurrent_choice(structure) -> RecipeChoice | None:
    """mamba-w8a8 / rwkv-w8a8 for a graph of Mamba mixers or RWKV time and channel mixing (no attention)."""
    family = structure.recurrent_family
    if family == "mamba":
        return RecipeChoice("mamba-w8a8", f"Mamba LM: {len(structure.mamba_mixers)} Mamba mixer(s) (in-projections, "
                                          "conv1d, selective scan, gated SiLU) and no attention")
    if family == "rwkv":
        kinds = [m.kind for m in structure.rwkv_mixes]
        return RecipeChoice("rwkv-w8a8", f"RWKV LM: {kinds.count('time')} time-mixing and {kinds.count('channel')} "
                                         "channel-mixing block(s) and no attention")
    return None


def _transformer_share(model: ir.Model, structure, sample: dict[str, np.ndarray] | None) -> float:
    names = set()
    for att in structure.attentions:
        names |= {lin.node.name for lin in (att.q, att.k, att.v, att.o) if lin is not None} | {att.qk.name, att.pv.name}
    for mlp in structure.mlps:
        names |= {lin.node.name for lin in (mlp.up, mlp.down, mlp.gate) if lin is not None}
    flops = _weighted_flops(model, sample)
    total = sum(flops.values())
    return sum(f for name, f in flops.items() if name in names) / total if total > 0 else 1.0


def _weighted_flops(model: ir.Model, sample: dict[str, np.ndarray] | None) -> dict[str, float]:
    """FLOPs of each weighted node, with the graph's inputs fixed to the sample's shapes."""
    copy = model.clone()
    for value in copy.graph.inputs:
        if sample is not None and value.name in sample:
            value.shape = ir.Shape(sample[value.name].shape)
    for node in copy.graph:  # stale annotations would otherwise win over the new input shapes
        for out in node.outputs:
            out.shape = None
    with contextlib.suppress(Exception):  # shapes only sharpen the count; without them symbolic dims count as 1
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(copy)
    return {node.name: node_flops(node) for node in copy.graph if node.op_type in WEIGHTED}
