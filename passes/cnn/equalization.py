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


@dataclass
class SecondConv:
    """The second conv's weight as (out, in-per-group, kernel) and, for each (out, in) slot, the middle
    channel it reads, so grouped and depthwise convs need no dense expansion."""

    weight: np.ndarray
    channel: np.ndarray

    @classmethod
    def of(cls, w2: np.ndarray, group: int) -> SecondConv:
        cout, cin_per_group = w2.shape[:2]
        first = (np.arange(cout) // (cout // group)) * cin_per_group
        return cls(w2.reshape(cout, cin_per_group, -1), first[:, None] + np.arange(cin_per_group)[None, :])

    def input_range(self) -> np.ndarray:
        """max |W2| over everything that reads each middle channel."""
        r2 = np.zeros(self.channel.max() + 1)
        np.maximum.at(r2, self.channel.ravel(), np.abs(self.weight).max(axis=2).ravel())
        return r2


def chain_noise(s: np.ndarray, w1: np.ndarray, conv2: SecondConv, stats: ChainStats, per_channel: bool) -> float:
    """Modelled INT8 noise power at the second conv's output for scales `s` (see module doc)."""
    w2 = conv2.weight * s[conv2.channel][:, :, None]
    energy = np.sum(w2 ** 2, axis=2)  # per (out, in) slot
    dz = np.max(stats.amax / s) / 127
    act = np.sum(energy) * dz ** 2 / 12
    row_range = np.abs(w2).reshape(len(w2), -1).max(axis=1)
    d2 = row_range / 127 if per_channel else np.full_like(row_range, row_range.max() / 127)
    weights2 = np.sum(d2 ** 2 * np.sum(w2.shape[2] * (stats.mean_square / s ** 2)[conv2.channel], axis=1)) / 12
    r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1) / s
    d1 = r1 / 127 if per_channel else np.full_like(r1, r1.max() / 127)
    weights1 = np.sum(energy * d1[conv2.channel] ** 2) / 12 * w1[0].size * stats.input_mean_square
    return float(act + weights2 + weights1)


def best_scales(w1: np.ndarray, conv2: SecondConv, stats: ChainStats, per_channel: bool, max_scale: float) -> np.ndarray:
    """The candidate s with the least modelled noise: powers of activation and weight ranges."""
    r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1)
    r2 = conv2.input_range()
    floor = lambda v: np.maximum(v, v.max() * 1e-6 + 1e-30)
    a, r1f, r2f = floor(stats.amax), floor(r1), floor(r2)
    candidates = [np.ones_like(a), data_free_scales(r1, r2)]
    for alpha in (0.25, 0.5, 0.75, 1.0):
        candidates.append(a ** alpha / r2f ** (1 - alpha))
        candidates.append(a ** alpha * r1f ** (1 - alpha))
    best, best_noise = candidates[0], np.inf
    for s in candidates:
        s = np.clip(s / np.exp(np.mean(np.log(s))), 1 / max_scale, max_scale)
        noise = chain_noise(s, w1, conv2, stats, per_channel)
        if noise < best_noise:
            best, best_noise = s, noise
    return best.astype(np.float32)
