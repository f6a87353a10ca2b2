"""Observers: what a pass wants to know about some tensors, accumulated batch by batch.

Each observer names the tensors it reads (`names`), gets their values for one calibration batch at a
time with padded positions already dropped (`update`, called by onnxq.stats.service), and keeps only
its running statistic, so any number of them can share one pass over the data. An observer whose
statistic is per tensor (`tensorwise = True`) may be handed a batch's tensors in several calls, as a
model run in segments produces them (onnxq.stats.service); `units()`, where defined, names the tensors
that must arrive together. The others get all their tensors of a batch in one call:
- Ranges: min and max (optionally of x times a per-channel scale);
- Histograms: fixed-range signed histograms, for the percentile, entropy and mse calibrators;
- ChannelStatistics: per-channel max |x| and mean x² along one axis;
- RowSample: a seeded random sample of rows (vectors along one axis) of each tensor;
- SecondMoments: E[xᵀx] over the rows of each tensor (last axis = channels);
- BatchValues: the tensors themselves for the first few batches (a reference to compare against).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Per tensor and batch, histograms see at most this many values (a strided subsample); ranges
# always see every value.
MAX_HISTOGRAM_SAMPLES = 1 << 18


@dataclass
class Range:
    lo: float
    hi: float

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


class Ranges:
    """Min and max of each tensor over every batch; with `scales`, of x · scale (scale broadcast
    against x, e.g. per channel on the last axis). Empty tensors are skipped."""

    tensorwise = True  # one statistic per tensor: a batch's tensors may come in several calls

    def __init__(self, names: Sequence[str], scales: Mapping[str, np.ndarray] | None = None):
        self.names = list(names)
        self.scales = dict(scales or {})
        self.result: dict[str, Range] = {}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for name, x in values.items():
            if x.size == 0:
                continue
            if name in self.scales:
                x = x * self.scales[name]
            lo, hi = float(x.min()), float(x.max())
            r = self.result.get(name)
            self.result[name] = Range(lo, hi) if r is None else Range(min(r.lo, lo), max(r.hi, hi))


class Histograms:
    """Signed histograms with 2×`bins` bins over [-amax, amax] of each tensor whose range (known from an
    earlier pass) is finite and non-zero; values beyond the range land in the outer bins. Large tensors
    contribute a regular subsample of at most MAX_HISTOGRAM_SAMPLES values per batch."""

    tensorwise = True  # one statistic per tensor: a batch's tensors may come in several calls

    def __init__(self, ranges: Mapping[str, Range], bins: int = 2048):
        self.bins = bins
        self.amax = {n: r.amax for n, r in ranges.items() if r.finite and r.amax > 0}
        self.names = list(self.amax)
        self.result = {n: np.zeros(2 * bins, dtype=np.int64) for n in self.names}

    def update(self, values: dict[str, np.ndarray]) -> None:
        bins = self.bins
        for name, x in values.items():
            amax = self.amax[name]
            flat = x.ravel()
            if flat.size > MAX_HISTOGRAM_SAMPLES:
                flat = flat[:: -(-flat.size // MAX_HISTOGRAM_SAMPLES)]
            shifted = flat.astype(np.float64)  # in place from here: one float64 temporary, not three
            shifted += amax
            shifted *= bins / amax
            index = shifted.astype(np.int64)
            np.clip(index, 0, 2 * bins - 1, out=index)
            self.result[name] += np.bincount(index, minlength=2 * bins)


@dataclass
class ChannelStats:
    amax: np.ndarray         # per channel: max |x|
    mean_square: np.ndarray  # per channel: mean of x² (empty when not asked for)


class ChannelStatistics:
    """Per-channel max |x| and (with `mean_square`) mean x² of each tensor. `axis` is the channel axis of
    the tensor as observed: 1 for (batch, channel, ...) layouts, -1 for rows of channels (a sequence
    tensor with its padding dropped arrives as (rows, channel))."""

    tensorwise = True  # one statistic per tensor: a batch's tensors may come in several calls

    def __init__(self, names: Sequence[str], *, axis: int = 1, mean_square: bool = True):
        self.names = list(names)
        self.axis = axis
        self.mean_square = mean_square
        self._amax: dict[str, np.ndarray] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for name, x in values.items():
            if self.axis == -1:
                x = x.reshape(-1, x.shape[-1])[:, :, None]  # (rows, channel, 1)
            else:
                x = np.moveaxis(x, self.axis, 1) if self.axis != 1 else x
                x = x.reshape(x.shape[0], x.shape[1], -1)   # (batch, channel, positions)
            m = np.abs(x).max(axis=(0, 2))
            self._amax[name] = m if name not in self._amax else np.maximum(self._amax[name], m)
            if self.mean_square:
                self._sums[name] = self._sums.get(name, 0.0) + np.einsum("bcp,bcp->c", x, x).astype(np.float64)
                self._counts[name] = self._counts.get(name, 0) + x.shape[0] * x.shape[2]

    @property
    def result(self) -> dict[str, ChannelStats]:
        empty = np.zeros(0)
        return {n: ChannelStats(a, self._sums[n] / self._counts[n] if self.mean_square else empty)
                for n, a in self._amax.items()}


class RowSample:
    """Up to `per_batch` rows of each tensor from every batch, drawn without replacement by a generator of
    its own per tensor (seeded with `seed` and the tensor's place in `axes`), batch after batch, so a
    sample is reproducible and does not depend on which other tensors are sampled or in which order they
    arrive. A row is a vector along the tensor's axis in `axes`; `in_order` keeps a batch's picks in their
    original order; `limit` truncates the final sample."""

    tensorwise = True  # each tensor's sample is its own: a batch's tensors may come in several calls

    def __init__(self, axes: Mapping[str, int], per_batch: int, seed: int, *, in_order: bool = False,
                 limit: int | None = None):
        self.axes = dict(axes)
        self.names = list(self.axes)
        self.per_batch = per_batch
        self.in_order = in_order
        self.limit = limit
        self.rngs = {n: np.random.default_rng([seed, i]) for i, n in enumerate(self.names)}
        self._kept: dict[str, list[np.ndarray]] = {n: [] for n in self.names}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for name, x in values.items():
            axis = self.axes[name]
            rows = x.reshape(-1, x.shape[-1]) if axis == -1 else np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            pick = self.rngs[name].choice(len(rows), size=min(self.per_batch, len(rows)), replace=False)
            if self.in_order:
                pick = np.sort(pick)
            self._kept[name].append(rows[pick].astype(np.float32, copy=True))

    @property
    def result(self) -> dict[str, np.ndarray]:
        return {n: np.concatenate(v)[:self.limit] for n, v in self._kept.items() if v}


class SecondMoments:
    """E[xᵀx] (float64) over the rows of each tensor, the last axis being the channels."""

    tensorwise = True  # one statistic per tensor: a batch's tensors may come in several calls

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: dict[str, np.ndarray]) -> None:
        for name, x in values.items():
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            self._sums[name] = self._sums.get(name, 0) + flat.T @ flat
            self._counts[name] = self._counts.get(name, 0) + len(flat)

    @property
    def result(self) -> dict[str, np.ndarray]:
        return {n: self._sums[n] / max(self._counts[n], 1) for n in self._sums}


class BatchValues:
    """The values of `names` for each of the first `batches` batches (all batches when None)."""

    def __init__(self, names: Sequence[str], batches: int | None = None):
        self.names = list(names)
        self.batches = batches
        self.result: list[dict[str, np.ndarray]] = []

    def update(self, values: dict[str, np.ndarray]) -> None:
        if self.batches is None or len(self.result) < self.batches:
            self.result.append(dict(values))
