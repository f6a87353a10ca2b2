"""Choose the activation calibrator by what it does to the model's outputs (`calibrator: auto`).

No calibrator is best on every model. With the transformer-w8a8 recipe, SmolLM2's perplexity is
lower with entropy's clipped ranges (+0.91% over FP32 against +1.03% with max), while MiniLM with
per-tensor weights does better with max's full ranges (relative output error 4.2e-3 against 2.8e-2).
`auto` therefore tries each candidate on the same statistics (one calibration sweep; thresholds
are cheap), inserts the activation Q/DQ into a copy of the model with its weights still float, runs
a few calibration batches and keeps the calibrator whose outputs are nearest the float model's:
relative squared error Σ(q − f)² / Σf², averaged over the float outputs. The trial batches are part
of the calibration set, so the measure is in-sample; it ranks candidates, it does not predict
held-out error.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxq.stats.calib_data import CalibrationSet
from onnxq.quant.calibrate import ActivationStatistics, Range
from onnxq.progress import progress
from onnxq.runtime.session import run_batches, session

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


def choose_calibrator(model: ir.Model, stats: ActivationStatistics, insert_qdq: InsertActivationQDQ,
                      data: CalibrationSet, *, symmetric: bool, percentile: float,
                      show_progress: bool = True) -> tuple[str, dict[str, Range], dict[str, float]]:
    """(best calibrator, its ranges, each candidate's relative output error)."""
    batches = list(itertools.islice(iter(data), TRIAL_BATCHES))
    reference = [outputs for _, outputs in run_batches(session(model), batches, padding_mask=data.padding_mask)]
    errors: dict[str, float] = {}
    ranges: dict[str, dict[str, Range]] = {}
    for method in progress(AUTO_CANDIDATES, desc="choosing calibrator", unit="calibrator", disable=not show_progress):
        ranges[method] = stats.ranges(method, symmetric=symmetric, percentile=percentile)
        trial = model.clone()
        insert_qdq(trial, ranges[method])
        outputs = [out for _, out in run_batches(session(trial), batches, padding_mask=data.padding_mask)]
        errors[method] = relative_output_error(reference, outputs)
    best = min(errors, key=errors.get)
    return best, ranges[best], errors
