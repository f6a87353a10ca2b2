"""equalize: cross-layer equalisation of Conv → (ReLU | ReLU6 | identity) → Conv chains.

Kind: exact. For output channel i of the first conv and the matching input channel of the second,
y_i = W1_i·x + b1_i, z = act(y), out = W2[:, i]·z_i + … . Dividing W1_i and b1_i by s_i > 0 and
multiplying W2[:, i] by s_i leaves `out` unchanged when act commutes with positive scaling:
ReLU does; Clip(lo, hi) becomes Max(lo/s)→Min(hi/s) with per-channel bounds (ReLU → Min for ReLU6),
which is exact. Choosing s_i = √(r1_i / r2_i), with r the channel's weight range in each conv,
gives both convs the same per-channel range √(r1_i·r2_i) (Nagel et al., "Data-Free Quantization",
2019), which is what lets depthwise CNNs such as MobileNetV2 use per-tensor weight scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.graph import Namer, add_initializer, attr, const_array, only_consumer, private_weight, replace_initializer
from onnxq.pipeline import GraphPass, Kind, PassContext, register

# per-channel bound ops this pass writes (and can rescale again on the next iteration)
_BOUNDS = ("Max", "Min")


@register
@dataclass
class Equalize(GraphPass):
    name: ClassVar[str] = "equalize"
    kind: ClassVar[Kind] = Kind.EXACT

    iterations: int = 4
    max_scale: float = 1e3  # bound s_i so nearly-dead channels are not blown up

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        for conv1, _, _ in _chains(graph):  # Clip → Relu + per-channel bounds, once, before scaling
            _clip_to_bounds(graph, namer, conv1)
        chains = _chains(graph)
        for conv1, _, conv2 in chains:  # the tensors between the pair now hold rescaled values
            _rename_rescaled(conv1, conv2)
        for _ in range(self.iterations):
            for conv1, bounds, conv2 in chains:
                w1 = const_array(private_weight(graph, namer, conv1, 1))
                w2 = const_array(private_weight(graph, namer, conv2, 1))
                r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
                r2 = _input_channel_range(w2, attr(conv2, "group", 1))
                with np.errstate(divide="ignore", invalid="ignore"):
                    s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / r2), 1.0)
                s = np.clip(s, 1 / self.max_scale, self.max_scale).astype(np.float32)
                _scale_output_channels(graph, namer, conv1, 1 / s)
                _scale_input_channels(conv2, s)
                for node in bounds:
                    bound = node.inputs[1]
                    replace_initializer(bound, (const_array(bound) / s.reshape(-1, 1, 1)).astype(np.float32))
        return {"pairs_equalised": len(chains)}


def _chains(graph: ir.Graph) -> list[tuple[ir.Node, list[ir.Node], ir.Node]]:
    """(conv1, per-channel bound nodes between them, conv2) for every equalisable chain."""
    found = []
    for conv1 in graph:
        if conv1.op_type != "Conv" or const_array(conv1.inputs[1]) is None:
            continue
        value, bounds = conv1.outputs[0], []
        node = only_consumer(value)
        while node is not None and _commutes_with_scaling(node) and node.inputs[0] is value:
            if node.op_type in _BOUNDS:
                bounds.append(node)
            value = node.outputs[0]
            node = only_consumer(value)
        if node is not None and node.op_type == "Conv" and node.inputs[0] is value \
                and const_array(node.inputs[1]) is not None \
                and _input_channels(node) == const_array(conv1.inputs[1]).shape[0]:
            found.append((conv1, bounds, node))
    return found


def _rename_rescaled(conv1: ir.Node, conv2: ir.Node) -> None:
    """Tensors whose values a pass changes get new names, so comparisons never pair them with the old."""
    value = conv1.outputs[0]
    while value is not conv2.inputs[0]:
        value.name = f"{value.name}_equalized"
        value = only_consumer(value).outputs[0]
    value.name = f"{value.name}_equalized"


def _commutes_with_scaling(node: ir.Node) -> bool:
    if node.op_type in ("Relu", "LeakyRelu", "Clip"):
        return all(v is None or const_array(v) is not None for v in node.inputs[1:])
    if node.op_type in _BOUNDS:  # only the per-channel bounds of shape (C, 1, 1) written here
        b = const_array(node.inputs[1]) if len(node.inputs) == 2 else None
        return b is not None and b.ndim == 3 and b.shape[1:] == (1, 1)
    return False


def _clip_to_bounds(graph: ir.Graph, namer: Namer, conv1: ir.Node) -> None:
    """Replace Clip(lo, hi) after conv1 by Relu (lo = 0) or Max(lo), then Min(hi), bounds per channel."""
    node = only_consumer(conv1.outputs[0])
    while node is not None and node.op_type in ("Relu", "LeakyRelu", "Clip", *_BOUNDS):
        if node.op_type == "Clip":
            channels = const_array(conv1.inputs[1]).shape[0]
            lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            x, out, steps = node.inputs[0], node.outputs[0], []
            if lo is not None:
                if float(lo) == 0.0:
                    steps.append(ir.node("Relu", [x], name=namer.fresh(f"{node.name}_relu")))
                else:
                    bound = add_initializer(graph, namer, f"{node.name}_min", np.full((channels, 1, 1), lo, np.float32))
                    steps.append(ir.node("Max", [x, bound], name=namer.fresh(f"{node.name}_lower")))
                x = steps[-1].outputs[0]
            if hi is not None:
                bound = add_initializer(graph, namer, f"{node.name}_max", np.full((channels, 1, 1), hi, np.float32))
                steps.append(ir.node("Min", [x, bound], name=namer.fresh(f"{node.name}_upper")))
            if not steps:
                return
            for step in steps[:-1]:
                step.outputs[0].name = namer.fresh(f"{step.name}_out")
            graph.insert_before(node, steps)
            out.replace_all_uses_with(steps[-1].outputs[0])
            steps[-1].outputs[0].name, out.name = out.name, None
            graph.remove(node, safe=True)
            node = steps[-1]
        node = only_consumer(node.outputs[0])


def _input_channels(conv: ir.Node) -> int:
    return const_array(conv.inputs[1]).shape[1] * attr(conv, "group", 1)


def _input_channel_range(w2: np.ndarray, group: int) -> np.ndarray:
    """max |W2| over everything that reads input channel i (grouped convs: only that group's rows)."""
    cout, cin_per_group = w2.shape[:2]
    per_group = np.abs(w2).reshape(group, cout // group, cin_per_group, -1).max(axis=(1, 3))
    return per_group.reshape(-1)


def _scale_output_channels(graph: ir.Graph, namer: Namer, conv: ir.Node, factor: np.ndarray) -> None:
    w = conv.inputs[1]
    replace_initializer(w, (const_array(w) * factor.reshape(-1, *([1] * (const_array(w).ndim - 1)))).astype(np.float32))
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        b = private_weight(graph, namer, conv, 2)
        replace_initializer(b, (const_array(b) * factor).astype(np.float32))


def _scale_input_channels(conv: ir.Node, factor: np.ndarray) -> None:
    w = const_array(conv.inputs[1])
    group = attr(conv, "group", 1)
    cout, cin_per_group = w.shape[:2]
    f = factor.reshape(group, 1, cin_per_group)  # channel i = group g, column i mod cin_per_group
    scaled = w.reshape(group, cout // group, cin_per_group, -1) * f[..., None]
    replace_initializer(conv.inputs[1], scaled.reshape(w.shape).astype(np.float32))
