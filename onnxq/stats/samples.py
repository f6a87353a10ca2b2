"""Row samples and channel maxima of activations, the statistics the smoothing, range-splitting and
softmax passes search over: one pass of the statistics service each, padding left out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.stats.observers import ChannelStatistics, RowSample
from onnxq.stats.service import observe


@dataclass
class Stats:
    """Per-channel (last axis) max |x| and a bounded random row sample of each tensor."""

    amax: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]

    def rows(self, name: str) -> np.ndarray:
        return self.samples[name]


def channel_max_and_rows(model: ir.Model, names: list[str], data, sample_rows: int, seed: int, *, show_progress: bool = True) -> Stats:
    """One pass over the calibration data: channel maxima and about `sample_rows` rows per tensor, an
    equal share from each batch (padding dropped), drawn by generators seeded with `seed`."""
    per_batch = max(1, math.ceil(sample_rows / max(len(data), 1)))
    amax = ChannelStatistics(names, axis=-1, mean_square=False)
    sample = RowSample({n: -1 for n in names}, per_batch, seed, in_order=True)
    observe(model, data, amax, sample, desc="smoothing statistics", show_progress=show_progress)
    return Stats({n: s.amax for n, s in amax.result.items()}, sample.result)


def sample_rows(model: ir.Model, axes: dict[str, int], data, limit: int, seed: int = 0, *,
                show_progress: bool = True) -> dict[str, np.ndarray]:
    """Up to `limit` rows of each tensor named in `axes` (rows along that axis), sampled over the calibration
    set: an equal share from each batch, padded positions left out, drawn by generators seeded with `seed`."""
    per_batch = max(1, limit // max(len(data), 1))
    sample = RowSample({n: axes[n] for n in sorted(axes)}, per_batch, seed, limit=limit)
    observe(model, data, sample, desc="sampling rows", show_progress=show_progress)
    return sample.result
