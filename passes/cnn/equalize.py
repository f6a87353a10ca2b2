"""equalize: cross-layer equalisation of Conv → (ReLU | ReLU6 | identity) → Conv chains.

Kind: exact. For output channel i of the first conv and the matching input channel of the second,
y_i = W1_i·x + b1_i, z = act(y), out = W2[:, i]·z_i + … . Dividing W1_i and b1_i by s_i > 0 and
multiplying W2[:, i] by s_i leaves `out` unchanged when act commutes with positive scaling:
ReLU does; Clip(lo, hi) becomes Max(lo/s)→Min(hi/s) with per-channel bounds (ReLU → Min for ReLU6),
which is exact. The choice of s only changes how much INT8 noise reaches `out`: with calibration
data, s is the candidate with the least modelled noise for the weight granularity in use
(onnxq.passes.cnn.equalization); without, it is the data-free s_i = √(r1_i / r2_i) of Nagel et al. (2019),
which gives both convs the same per-channel weight range. Either way depthwise CNNs such as
MobileNetV2 stop losing their small channels to a shared per-tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import (
    Namer,
    add_initializer,
    attr,
    const_array,
    const_tensor,
    is_const,
    only_consumer,
    private_weight,
    replace_initializer,
)
from onnxq.passes.cnn.equalization import ChainStats, SecondConv, best_scales, data_free_scales
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize
from onnxq.stats.observers import ChannelStatistics
from onnxq.stats.service import observe

# per-channel bound ops this pass writes (and can rescale again on the next iteration)
_BOUNDS = ("Max", "Min")


@dataclass(frozen=True)
class Equalize(GraphPass):
    name: ClassVar[str] = "equalize"
    kind: ClassVar[Kind] = Kind.EXACT

    iterations: int = option(4, low=1)  # rounds of the data-free rule (the data-driven choice needs one)
    max_scale: float = option(1e3, low=1.0)  # bound s_i so nearly-dead channels are not blown up
    use_data: bool = True   # choose s from calibration statistics when data is given

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        per_channel = ctx.scheme.per_channel  # scales are chosen for the quantize step's weight granularity
        use_data = self.use_data and ctx.calibration is not None
        chains = self._select(graph, namer, per_channel, use_data, ctx.target)
        stats = self._statistics(model, chains, ctx) if use_data and chains else None
        for conv1, _, conv2 in chains:  # the tensors between the pair now hold rescaled values
            _rename_rescaled(conv1, conv2)
        for _ in range(1 if stats else self.iterations):
            for conv1, bounds, conv2 in chains:
                s = self._scales(graph, namer, conv1, conv2, stats and stats[conv2.name], per_channel)
                _scale_output_channels(graph, namer, conv1, 1 / s)
                _scale_input_channels(conv2, s)
                for node in bounds:
                    bound = node.inputs[1]
                    old = const_array(bound)
                    replace_initializer(bound, (old / s.reshape(-1, 1, 1)).astype(old.dtype))
        return {"pairs_equalised": len(chains), "scales_from": "calibration data" if stats else "weights only"}

    def _select(self, graph, namer, per_channel: bool, use_data: bool, target: str):
        """The chains worth equalising, with their Clips already rewritten into per-channel bounds."""
        # With per-channel weights, rescaling is free only where the second conv is grouped (each
        # input channel has its own filters); into a dense conv it trades activation noise for
        # weight noise, which measured worse on MobileNetV2, so those chains are left alone.
        chosen = [c for c in _chains(graph) if not (use_data and per_channel and attr(c[2], "group", 1) == 1)]
        if target == "ort-cpu":  # per-channel bounds (rescaled ReLU6) have no integer kernel in ORT
            chosen = [c for c in chosen if not _bounded_above(c[0])]
        for conv1, _, _ in chosen:  # Clip → Relu + per-channel bounds, once, before any scaling
            _clip_to_bounds(graph, namer, conv1)
        firsts = {conv1 for conv1, _, _ in chosen}
        return [c for c in _chains(graph) if c[0] in firsts]

    def _scales(self, graph, namer, conv1, conv2, stats: ChainStats | None, per_channel: bool) -> np.ndarray:
        w1 = const_array(private_weight(graph, namer, conv1, 1))
        w2 = const_array(private_weight(graph, namer, conv2, 1))
        group = attr(conv2, "group", 1)
        if stats is not None:
            return best_scales(w1, SecondConv.of(w2, group), stats, per_channel, self.max_scale)
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
        s = data_free_scales(r1, SecondConv.of(w2, group).input_range())
        return np.clip(s, 1 / self.max_scale, self.max_scale).astype(np.float32)

    def _statistics(self, model: ir.Model, chains, ctx: PassContext) -> dict[str, ChainStats]:
        """Per-channel magnitude and mean square of each chain's middle tensor, one streaming sweep."""
        middle = {conv2.name: conv2.inputs[0].name for _, _, conv2 in chains}
        first_in = {conv2.name: conv1.inputs[0].name for conv1, _, conv2 in chains}
        channels = ChannelStatistics(sorted(set(middle.values()) | set(first_in.values())), axis=1)
        observe(model, ctx.calibration, channels, desc="channel statistics", show_progress=ctx.show_progress)
        observed = channels.result
        return {key: ChainStats(observed[name].amax, observed[name].mean_square,
                                float(observed[first_in[key]].mean_square.mean()))
                for key, name in middle.items()}


def _chains(graph: ir.Graph) -> list[tuple[ir.Node, list[ir.Node], ir.Node]]:
    """(conv1, per-channel bound nodes between them, conv2) for every equalisable chain."""
    found = []
    for conv1 in graph:
        if conv1.op_type != "Conv" or not is_const(conv1.inputs[1]):
            continue
        value, bounds = conv1.outputs[0], []
        node = only_consumer(value)
        while node is not None and _commutes_with_scaling(node) and node.inputs[0] is value:
            if node.op_type in _BOUNDS:
                bounds.append(node)
            value = node.outputs[0]
            node = only_consumer(value)
        if node is not None and node.op_type == "Conv" and node.inputs[0] is value \
                and is_const(node.inputs[1]) \
                and _input_channels(node) == const_tensor(conv1.inputs[1]).shape[0]:
            found.append((conv1, bounds, node))
    return found


def _bounded_above(conv1: ir.Node) -> bool:
    """Whether a Clip with an upper bound (ReLU6) sits between conv1 and the next conv."""
    node = only_consumer(conv1.outputs[0])
    while node is not None and node.op_type in ("Relu", "LeakyRelu", "Clip", *_BOUNDS):
        if node.op_type == "Min" or (node.op_type == "Clip" and len(node.inputs) > 2 and node.inputs[2] is not None):
            return True
        node = only_consumer(node.outputs[0])
    return False


def _rename_rescaled(conv1: ir.Node, conv2: ir.Node) -> None:
    """Tensors whose values a pass changes get new names, so comparisons never pair them with the old."""
    value = conv1.outputs[0]
    while value is not conv2.inputs[0]:
        value.name = f"{value.name}_equalized"
        value = only_consumer(value).outputs[0]
    value.name = f"{value.name}_equalized"


def _commutes_with_scaling(node: ir.Node) -> bool:
    if node.op_type in ("Relu", "LeakyRelu", "Clip"):
        return all(v is None or is_const(v) for v in node.inputs[1:])
    if node.op_type in _BOUNDS:  # only the per-channel bounds of shape (C, 1, 1) written here
        b = const_array(node.inputs[1]) if len(node.inputs) == 2 else None
        return b is not None and b.ndim == 3 and b.shape[1:] == (1, 1)
    return False


def _clip_to_bounds(graph: ir.Graph, namer: Namer, conv1: ir.Node) -> None:
    """Replace Clip(lo, hi) after conv1 by Relu (lo = 0) or Max(lo), then Min(hi), bounds per channel."""
    node = only_consumer(conv1.outputs[0])
    while node is not None and node.op_type in ("Relu", "LeakyRelu", "Clip", *_BOUNDS):
        if node.op_type == "Clip":
            channels = const_tensor(conv1.inputs[1]).shape[0]
            lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            x, out, steps = node.inputs[0], node.outputs[0], []
            if lo is not None:
                if float(lo) == 0.0:
                    steps.append(ir.node("Relu", [x], name=namer.fresh(f"{node.name}_relu")))
                else:
                    bound = add_initializer(graph, namer, f"{node.name}_min", np.full((channels, 1, 1), lo, lo.dtype))
                    steps.append(ir.node("Max", [x, bound], name=namer.fresh(f"{node.name}_lower")))
                x = steps[-1].outputs[0]
            if hi is not None:
                bound = add_initializer(graph, namer, f"{node.name}_max", np.full((channels, 1, 1), hi, hi.dtype))
                steps.append(ir.node("Min", [x, bound], name=namer.fresh(f"{node.name}_upper")))
            if not steps:
                return
            for step in steps:  # typed, so runs that expose them (statistics) keep FP16 as FP16
                step.outputs[0].dtype, step.outputs[0].shape = out.dtype, out.shape
            for step in steps[:-1]:
                step.outputs[0].name = namer.fresh(f"{step.name}_out")
            graph.insert_before(node, steps)
            out.replace_all_uses_with(steps[-1].outputs[0])
            steps[-1].outputs[0].name, out.name = out.name, None
            graph.remove(node, safe=True)
            node = steps[-1]
        node = only_consumer(node.outputs[0])


def _input_channels(conv: ir.Node) -> int:
    return const_tensor(conv.inputs[1]).shape[1] * attr(conv, "group", 1)


def _scale_output_channels(graph: ir.Graph, namer: Namer, conv: ir.Node, factor: np.ndarray) -> None:
    w = conv.inputs[1]
    old = const_array(w)  # every rescaled constant keeps its type (FP32, or FP16 in an FP16 model)
    replace_initializer(w, (old * factor.reshape(-1, *([1] * (old.ndim - 1)))).astype(old.dtype))
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        b = private_weight(graph, namer, conv, 2)
        replace_initializer(b, (const_array(b) * factor).astype(const_array(b).dtype))


def _scale_input_channels(conv: ir.Node, factor: np.ndarray) -> None:
    w = const_array(conv.inputs[1])
    group = attr(conv, "group", 1)
    cout, cin_per_group = w.shape[:2]
    f = factor.reshape(group, 1, cin_per_group)  # channel i = group g, column i mod cin_per_group
    scaled = w.reshape(group, cout // group, cin_per_group, -1) * f[..., None]
    replace_initializer(conv.inputs[1], scaled.reshape(w.shape).astype(w.dtype))
