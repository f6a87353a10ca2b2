"""Empirical bias correction: remove the mean shift each quantized layer adds to its output.

Rounding weights and inputs does not only add noise; over a channel it also shifts the mean, and
through ReLUs and residual sums those shifts add up layer after layer. For each quantized
Conv/Gemm with a float bias, a twin of the layer computes the float result from the same
(unquantized) input in the quantized model; the per-channel mean of (quantized − float) over the
calibration data is subtracted from the bias. Measuring each layer against its own float twin keeps
the correction local: a layer does not also correct the drift of the layers before it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, const_array, is_const, replace_initializer
from onnxq.metadata import CORRECTED_KEY
from onnxq.stats.calib_data import CalibrationSet
from onnxq.stats.service import observe

_CORRECTABLE = ("Conv", "Gemm")


def correct_biases(model: ir.Model, float_weights: dict[str, np.ndarray], data: CalibrationSet, *,
                   show_progress: bool = True) -> int:
    """Adjust the biases of quantized Conv/Gemm layers in `model` in place; return how many changed.

    `float_weights` maps each layer name to its weight before quantization."""
    if not any(node.name in float_weights and correctable(node) for node in model.graph):
        return 0  # no copy of the model for nothing to correct (transformers: MatMuls without a bias)
    probe = model.clone()  # a scratch copy (sharing the weights, wherever they are) that gets the float twins
    namer = Namer(probe.graph)
    pairs: dict[str, tuple[str, str, int]] = {}
    for node in list(probe.graph):
        x = _float_source(node.inputs[0]) if correctable(node) else None
        if x is None or node.name not in float_weights:
            continue
        weight = add_initializer(probe.graph, namer, f"{node.name}_float_weight", float_weights[node.name])
        twin = ir.node(node.op_type, [x, weight, node.inputs[2]], dict(node.attributes),
                       name=namer.fresh(f"{node.name}_float_twin"))
        twin.outputs[0].name = namer.fresh(f"{node.outputs[0].name}_float")
        twin.outputs[0].dtype = node.outputs[0].dtype
        probe.graph.append(twin)
        pairs[node.name] = (node.outputs[0].name, twin.outputs[0].name, 1 if node.op_type == "Conv" else -1)
    if not pairs:
        return 0
    shifts = OutputShift(pairs)
    observe(probe, data, shifts, desc="bias correction", show_progress=show_progress)
    nodes = {n.name: n for n in model.graph}
    for layer, total in shifts.total.items():
        bias = nodes[layer].inputs[2]
        mean = total / shifts.batches
        old = const_array(bias)
        replace_initializer(bias, (old - mean).astype(old.dtype))  # FP16 biases stay FP16
        nodes[layer].metadata_props[CORRECTED_KEY] = f"mean |shift| {float(np.abs(mean).mean()):.3g}"
    return len(pairs)


def correctable(node: ir.Node) -> bool:
    """A Conv or Gemm with a constant bias (the input its correction is subtracted from)."""
    return (node.op_type in _CORRECTABLE and len(node.inputs) >= 3 and node.inputs[0] is not None
            and node.inputs[2] is not None and is_const(node.inputs[2]))


class OutputShift:
    """Per layer, the sum over batches of the per-channel mean of (quantized − float twin) output.

    `pairs` maps a layer to (its output, its twin's output, channel axis). Means are taken per batch and
    then averaged over batches. Layer outputs are (batch, channel, ...) or (rows, channel) tensors, so
    dropping padded positions (the service does) leaves their channel axis where it was."""

    def __init__(self, pairs: dict[str, tuple[str, str, int]]):
        self.pairs = pairs
        self.names = [n for q, f, _ in pairs.values() for n in (q, f)]
        self.total = {layer: 0.0 for layer in pairs}
        self.batches = 0

    def update(self, values: dict[str, np.ndarray]) -> None:
        self.batches += 1
        for layer, (q, f, axis) in self.pairs.items():
            diff = np.moveaxis(values[q].astype(np.float64) - values[f], axis, 0)
            self.total[layer] = self.total[layer] + diff.reshape(diff.shape[0], -1).mean(axis=1)


def _float_source(value: ir.Value | None) -> ir.Value | None:
    """The float tensor behind DQ(Q(x)), i.e. x; None if `value` is not a quantized activation."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].producer() is None:
        return None
    q = dq.inputs[0].producer()
    return q.inputs[0] if q.op_type == "QuantizeLinear" else None
