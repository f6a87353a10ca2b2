"""Calibrators: activation ranges from the statistics the calibration data gave.

Statistics come from two passes over the data (onnxq.stats.service): the first finds each tensor's
range, the second fills a fixed-range histogram (2×`bins` bins over [-amax, amax]) for the
calibrators that need a distribution (onnxq.stats.observers.Histograms).

Calibrators choose a clipping threshold from a one-sided histogram of |x| (symmetric targets) or
of each tail (asymmetric targets):
- max: the largest magnitude seen;
- percentile: the magnitude below which `percentile`% of values lie;
- entropy: TensorRT's KL-divergence threshold search over 128 quantization levels;
- mse: the threshold minimising the expected squared INT8 quantization error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.stats.calib_data import CalibrationSet
from onnxq.stats.observers import Histograms, Range, Ranges
from onnxq.stats.service import Observer, StatisticsService

CALIBRATORS = ("max", "percentile", "entropy", "mse")


def one_sided_threshold(hist: np.ndarray, edge: float, method: str, *, percentile: float = 99.99) -> float:
    """Clipping threshold in [0, edge] for the one-sided histogram `hist` of magnitudes on [0, edge]."""
    total = hist.sum()
    if total == 0 or edge <= 0:
        return 0.0
    n = len(hist)
    width = edge / n
    if method == "max":
        nonzero = np.nonzero(hist)[0]
        return float((nonzero[-1] + 1) * width)
    if method == "percentile":
        k = int(np.searchsorted(np.cumsum(hist), total * percentile / 100.0))
        return float(min(k + 1, n) * width)
    if method == "entropy":
        return float(_kl_threshold_bin(hist) * width)
    if method == "mse":
        return _mse_threshold(hist, width)
    raise OnnxqError(f"unknown calibrator '{method}' (choose from {', '.join(CALIBRATORS)})")


def _kl_threshold_bin(hist: np.ndarray, levels: int = 128) -> int:
    """TensorRT's entropy calibration: the bin count i whose clipped-and-requantized histogram keeps
    the smallest KL divergence from the reference distribution (outliers folded into the last bin)."""
    hist = hist.astype(np.float64)
    # A ReLU output puts half its mass in the zero bin; left in, that spike dominates the divergence
    # and drags the threshold towards zero, so it is flattened to its neighbour's height first.
    hist[0] = hist[1] if len(hist) > 1 else hist[0]
    n = len(hist)
    if np.count_nonzero(hist) <= 1 or n <= levels:
        return int(np.nonzero(hist)[0][-1] + 1) if hist.any() else n
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])

    def kl_at(i: int) -> float:
        ref = hist[:i].copy()
        if i < n:
            ref[-1] += tail[i]
        # merge the i bins into `levels` groups, then spread each group's mass over its non-empty bins
        starts = (np.arange(levels) * i) // levels
        group_sum = np.add.reduceat(hist[:i], starts)
        nonzero = hist[:i] > 0
        group_nonzero = np.add.reduceat(nonzero.astype(np.float64), starts)
        group_of_bin = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        with np.errstate(divide="ignore", invalid="ignore"):
            per_bin = np.where(group_nonzero[group_of_bin] > 0, group_sum[group_of_bin] / group_nonzero[group_of_bin], 0)
        q = np.where(nonzero, per_bin, 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            return math.inf
        q = q / qs
        mask = p > 0
        # bins with mass in p but none in q get a tiny floor instead of an infinite divergence
        return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))

    # coarse sweep every 16 bins, then every bin around the best coarse candidate
    coarse = range(levels, n + 1, 16)
    best = min(coarse, key=kl_at)
    fine = range(max(levels, best - 16), min(n, best + 16) + 1)
    return min(fine, key=kl_at)


def _mse_threshold(hist: np.ndarray, width: float, qmax: int = 127) -> float:
    """Threshold minimising sum(count · (x − Q(x))²) over bin centres, for symmetric INT8."""
    centres = (np.arange(len(hist)) + 0.5) * width
    weights = hist.astype(np.float64)
    last = (np.nonzero(hist)[0][-1] + 1) * width
    best_t, best_err = last, math.inf
    for t in np.linspace(last / 64, last, 192):
        scale = t / qmax
        q = np.minimum(np.round(centres / scale), qmax) * scale
        err = float(np.dot(weights, (centres - q) ** 2))
        if err < best_err:
            best_err, best_t = err, float(t)
    return best_t


def fold_symmetric(signed_hist: np.ndarray) -> np.ndarray:
    """|x| histogram from a signed histogram laid out symmetrically around zero."""
    half = len(signed_hist) // 2
    return signed_hist[half:] + signed_hist[:half][::-1]


@dataclass
class ActivationStatistics:
    """What calibration saw of each tensor: its raw range and, when asked for, its signed histogram.
    Collected once, they give every calibrator's ranges (the `auto` choice tries several)."""
    raw: dict[str, Range]
    histograms: dict[str, np.ndarray]

    def ranges(self, method: str, *, symmetric: bool = True, percentile: float = 99.99) -> dict[str, Range]:
        """Calibrated range of each tensor: [-t, t] when symmetric, [lo, hi] otherwise."""
        if method not in CALIBRATORS:
            raise OnnxqError(f"unknown calibrator '{method}' (choose from {', '.join(CALIBRATORS)})")
        if method == "max":
            return {n: (Range(-r.amax, r.amax) if symmetric else r) for n, r in self.raw.items()}
        result = {}
        for name, r in self.raw.items():
            h, edge = self.histograms.get(name), r.amax
            if h is None:
                result[name] = r  # zero or non-finite range: the planner decides what to do with it
            elif symmetric:
                t = one_sided_threshold(fold_symmetric(h), edge, method, percentile=percentile)
                result[name] = Range(-t, t)
            else:
                half = len(h) // 2
                hi = one_sided_threshold(h[half:], edge, method, percentile=percentile)
                lo = -one_sided_threshold(h[:half][::-1], edge, method, percentile=percentile)
                result[name] = Range(min(lo, 0.0), max(hi, 0.0))
        return result


def collect_statistics(model: ir.Model, names: Sequence[str], data: CalibrationSet, *, histograms: bool,
                       bins: int = 2048, show_progress: bool = True,
                       alongside: Sequence[Observer] = ()) -> ActivationStatistics:
    """Ranges of `names` over the calibration set, and their histograms when `histograms` (a second
    pass: the bins need the range). `alongside` observers of the same model state ride on the first pass."""
    sweep = StatisticsService(model, data, show_progress=show_progress)
    ranges = sweep.register(Ranges(names))
    for observer in alongside:
        sweep.register(observer)
    sweep.run("calibrating ranges")
    hists = {}
    if histograms:
        second = StatisticsService(model, data, show_progress=show_progress, reuse=sweep)  # same model state
        hists = second.register(Histograms(ranges.result, bins)).result
        second.run("calibrating histograms")
    return ActivationStatistics(ranges.result, hists)
