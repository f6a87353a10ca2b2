"""Choosing per-channel equalisation scales for a Conv → activation → Conv chain.

With scales s (the chain's middle tensor z becomes z/s, the second conv's input channels are
multiplied by s, the first conv's output channels divided by s), the FP32 function is unchanged,
but the INT8 noise reaching the second conv's output is not. This module models that noise from
calibration statistics and picks the best s from a family of candidates:

- middle activation (quantized per tensor with step Δz = max_i(a_i/s_i)/127):
      Σ_o Σ_i Σ_k (W2[o,i,k]·s_i)² · Δz²/12
- second conv's weights (step Δ2_o = max over row o of |W2·s| / 127, per channel or tensor):
      Σ_o Δ2_o²/12 · Σ_{i read by o} K · m_i/s_i²
- first conv's weights (step Δ1_i = r1_i/s_i/127 per channel, or max_j r1_j/s_j/127 per tensor),
  through the second conv: Σ_o Σ_i Σ_k (W2[o,i,k]·s_i)² · Δ1_i²/12 · n1 · e_x
where a_i is channel i's calibrated magnitude, m_i its mean square, r1_i the first conv's weight
range for channel i, n1 its fan-in, e_x the mean square of its input, K the second conv's kernel
size. Uniform rounding noise (variance Δ²/12) is the standard model; it ranks candidates well.
Without statistics, the data-free choice s_i = √(r1_i / r2_i) (Nagel et al., 2019) is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChainStats:
    amax: np.ndarray        # per middle channel: max |z_i| over the calibration data
    mean_square: np.ndarray  # per middle channel: E[z_i²]
    input_mean_square: float  # E[x²] of the first conv's input


def data_free_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / r2), 1.0)


def chain_noise(s: np.ndarray, w1: np.ndarray, w2_by_input: np.ndarray, stats: ChainStats, per_channel: bool) -> float:
    """Modelled INT8 noise power at the second conv's output for scales `s` (see module doc).

    `w2_by_input` is the second conv's weight as (out, in, kernel) with `in` the middle channels
    (grouped convs expanded to dense, zeros where a group does not read a channel)."""
    w2 = w2_by_input * s[None, :, None]
    dz = np.max(stats.amax / s) / 127
    act = np.sum(w2 ** 2) * dz ** 2 / 12
    row_range = np.abs(w2).reshape(len(w2), -1).max(axis=1)
    d2 = row_range / 127 if per_channel else np.full_like(row_range, row_range.max() / 127)
    reads = np.any(w2_by_input != 0, axis=2) * w2.shape[2]  # taps of row o on channel i (grouped: 0 outside)
    weights2 = float(np.sum(d2 ** 2 * (reads @ (stats.mean_square / s ** 2)))) / 12
    r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1) / s
    d1 = r1 / 127 if per_channel else np.full_like(r1, r1.max() / 127)
    fan_in = w1[0].size
    weights1 = np.sum(np.sum(w2 ** 2, axis=(0, 2)) * d1 ** 2) / 12 * fan_in * stats.input_mean_square
    return float(act + weights2 + weights1)


def best_scales(w1: np.ndarray, w2_by_input: np.ndarray, stats: ChainStats, per_channel: bool,
                max_scale: float) -> np.ndarray:
    """The candidate s with the least modelled noise: powers of activation and weight ranges."""
    r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1)
    r2 = np.abs(w2_by_input).max(axis=(0, 2))
    floor = lambda v: np.maximum(v, v.max() * 1e-6 + 1e-30)  # noqa: E731  (dead channels stay finite)
    a, r1f, r2f = floor(stats.amax), floor(r1), floor(r2)
    candidates = [np.ones_like(a), data_free_scales(r1, r2)]
    for alpha in (0.25, 0.5, 0.75, 1.0):
        candidates.append(a ** alpha / r2f ** (1 - alpha))
        candidates.append(a ** alpha * r1f ** (1 - alpha))
    best, best_noise = candidates[0], np.inf
    for s in candidates:
        s = np.clip(s / np.exp(np.mean(np.log(s))), 1 / max_scale, max_scale)
        noise = chain_noise(s, w1, w2_by_input, stats, per_channel)
        if noise < best_noise:
            best, best_noise = s, noise
    return best.astype(np.float32)
