"""Choose the activation calibrator by what it does to the model's outputs (`calibrator: auto`).

No calibrator is best on every model: clipped ranges (entropy, percentile) suit LMs whose rare
large activations matter little, full ranges (max) suit models where they carry the signal. `auto` therefore tries each candidate on the same statistics (one calibration sweep; thresholds
are cheap), inserts the activation Q/DQ into a copy of the model with its weights still float, runs
a few calibration batches and keeps the calibrator whose outputs are nearest the float model's:
relative squared error Σ(q − f)² / Σf², averaged over the float outputs. The trial batches are part
of the calibration set, so the measure is in-sample; it ranks candidates, it does not predict
held-out error.

The candidates' trial models differ only in the values of their Q/DQ scales and zero points, so
one ONNX Runtime session serves them all: those initializers become graph inputs (overridable)
and each candidate feeds its own. Candidates whose graphs differ (a range usable under one
calibrator and not another) get a session of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import to_proto_without_weights
from onnxq.progress import progress
from onnxq.quant.calibrate import ActivationStatistics, Range
from onnxq.runtime.segments import SegmentedModel, worth_segmenting
from onnxq.runtime.session import DetachedModel, detach, session
from onnxq.stats.calib_data import CalibrationSet
from onnxq.stats.observers import BatchValues
from onnxq.stats.service import observe, real_rows

AUTO_CANDIDATES = ("entropy", "max", "mse", "percentile")
FP8_CANDIDATES = ("max", "percentile")  # entropy and mse choose their clip for the uniform INT8 grid
TRIAL_BATCHES = 4

InsertActivationQDQ = Callable[[ir.Model, dict[str, Range]], None]


def relative_output_error(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> float:
    """Mean over float outputs of Σ(q − f)² / Σf², summed over the batches."""
    errors = []
    for name in reference[0]:
        if not np.issubdtype(reference[0][name].dtype, np.floating):
            continue
        diff = sum(float(np.sum((o[name].astype(np.float64) - r[name]) ** 2)) for r, o in zip(reference, outputs))
        norm = sum(float(np.sum(r[name].astype(np.float64) ** 2)) for r in reference)
        errors.append(diff / max(norm, 1e-30))
    return float(np.mean(errors)) if errors else 0.0


def reference_outputs(model: ir.Model) -> BatchValues:
    """An observer keeping the float model's outputs on the trial batches; register it on a pass over
    the same model state (the range sweep) so the reference costs no run of its own."""
    return BatchValues([o.name for o in model.graph.outputs], TRIAL_BATCHES)


def choose_calibrator(model: ir.Model, stats: ActivationStatistics, insert_qdq: InsertActivationQDQ,
                      data: CalibrationSet, *, symmetric: bool, percentile: float, show_progress: bool = True,
                      reference: BatchValues | None = None, candidates: tuple[str, ...] = AUTO_CANDIDATES,
                      ) -> tuple[str, dict[str, Range], dict[str, float]]:
    """(best of `candidates`, its ranges, each candidate's relative output error). `reference`: the float
    model's outputs on the trial batches if already observed (reference_outputs), else they are run here."""
    if reference is None:
        reference = reference_outputs(model)
        observe(model, data, reference, desc="calibrator reference", show_progress=False, max_batches=TRIAL_BATCHES)
    errors: dict[str, float] = {}
    ranges: dict[str, dict[str, Range]] = {}
    shared: _SharedTrial | None = None
    for method in progress(candidates, desc="choosing calibrator", unit="calibrator", disable=not show_progress):
        ranges[method] = stats.ranges(method, symmetric=symmetric, percentile=percentile)
        trial = model.clone()
        insert_qdq(trial, ranges[method])
        if shared is None or not shared.serves(trial):
            shared = _SharedTrial(trial)
        errors[method] = relative_output_error(reference.result, shared.outputs(trial, data))
    best = min(errors, key=errors.get)
    return best, ranges[best], errors


class _SharedTrial:
    """One session for trial models that differ from `first` only in initializer values: the
    initializers a Q/DQ node reads for its scale and zero point are graph inputs, fed per trial."""

    def __init__(self, first: ir.Model):
        self.signature = _signature(first)
        self.parameters = sorted({v.name for node in first.graph if node.op_type in _QDQ
                                  for v in node.inputs[1:] if v is not None and v.is_initializer()})
        # a large model runs in segments (onnxq.runtime.segments): its weights stay out of the proto
        self.segmented = worth_segmenting(first)
        detached = DetachedModel(*to_proto_without_weights(first)) if self.segmented else detach(first)
        listed = {i.name for i in detached.proto.graph.input}
        initializers = {t.name: t for t in detached.proto.graph.initializer}
        for name in self.parameters:
            if name not in listed:
                tensor = initializers[name]
                detached.proto.graph.input.append(
                    onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
        self.outputs_names = [o.name for o in first.graph.outputs]
        if self.segmented:
            self.runner = SegmentedModel(first, self.outputs_names, proto=detached.proto, weights=detached.weights)
        else:
            self.session = session(detached)

    def serves(self, trial: ir.Model) -> bool:
        return _signature(trial) == self.signature

    def outputs(self, trial: ir.Model, data: CalibrationSet) -> list[dict[str, np.ndarray]]:
        """The trial model's outputs on the first TRIAL_BATCHES calibration batches, padded positions
        dropped as the statistics service drops them (the reference was observed through it)."""
        values = trial.graph.initializers
        fed = {name: values[name].const_value.numpy() for name in self.parameters}
        padding = getattr(data, "padding_mask", None)
        result = []
        feeds = [{**feed, **fed} for feed in itertools.islice(iter(data), TRIAL_BATCHES)]
        computed = self.runner.collect(feeds) if self.segmented else None
        for b, feed in enumerate(feeds):
            try:
                outputs = ([computed[b][n] for n in self.outputs_names] if computed is not None else
                           self.session.run(self.outputs_names, feed))
            except Exception as exc:  # ORT raises its own exception types for bad feeds
                raise OnnxqError(f"ONNX Runtime failed on a batch: {str(exc).splitlines()[0]}") from None
            mask = feed.get(padding) if padding else None
            if mask is not None and not mask.all():
                outputs = [real_rows(x, mask.astype(bool)) for x in outputs]
            result.append(dict(zip(self.outputs_names, outputs)))
        return result


_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _signature(model: ir.Model) -> tuple:
    """The graph without Q/DQ parameter values: nodes with their inputs, outputs and attributes."""
    return tuple((n.op_type, n.domain, tuple(v.name if v is not None else "" for v in n.inputs),
                  tuple(v.name for v in n.outputs), tuple(sorted((k, repr(a.value)) for k, a in n.attributes.items())))
                 for n in model.graph)
