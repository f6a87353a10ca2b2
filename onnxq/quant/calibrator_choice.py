"""Choose the activation calibrator by what it does to the model's outputs (`calibrator: auto`).

No calibrator is best on every model: clipped ranges (entropy, percentile) suit LMs whose rare
large activations matter little, full ranges (max) suit models where they carry the signal. `auto` therefore tries each candidate on the same statistics (one calibration sweep; thresholds
are cheap), inserts the activation Q/DQ into a copy of the model with its weights still float, runs
a few calibration batches and keeps the calibrator whose outputs are nearest the float model's:
relative squared error Σ(q − f)² / Σf², averaged over the float outputs. The trial batches are part
of the calibration set, so the measure is in-sample; it ranks candidates, it does not predict
held-out error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.progress import progress
from onnxq.quant.calibrate import ActivationStatistics, Range
from onnxq.stats.calib_data import CalibrationSet
from onnxq.stats.observers import BatchValues
from onnxq.stats.service import observe

AUTO_CANDIDATES = ("entropy", "max", "mse", "percentile")
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
                      reference: BatchValues | None = None) -> tuple[str, dict[str, Range], dict[str, float]]:
    """(best calibrator, its ranges, each candidate's relative output error). `reference`: the float
    model's outputs on the trial batches if already observed (reference_outputs), else they are run here."""
    if reference is None:
        reference = reference_outputs(model)
        observe(model, data, reference, desc="calibrator reference", show_progress=False, max_batches=TRIAL_BATCHES)
    errors: dict[str, float] = {}
    ranges: dict[str, dict[str, Range]] = {}
    for method in progress(AUTO_CANDIDATES, desc="choosing calibrator", unit="calibrator", disable=not show_progress):
        ranges[method] = stats.ranges(method, symmetric=symmetric, percentile=percentile)
        trial = model.clone()
        insert_qdq(trial, ranges[method])
        outputs = BatchValues([o.name for o in trial.graph.outputs], TRIAL_BATCHES)
        observe(trial, data, outputs, desc=f"trying {method}", show_progress=False, max_batches=TRIAL_BATCHES)
        errors[method] = relative_output_error(reference.result, outputs.result)
    best = min(errors, key=errors.get)
    return best, ranges[best], errors
