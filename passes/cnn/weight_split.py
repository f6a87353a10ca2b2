"""Coarse and fine parts of a weight: W = W_c + W_f with W_c exactly on the INT8 grid of W's own step.

With g = max|W| / qmax (per tensor, or per output channel), W_c = g·round(W/g) takes exactly the
values the quantizer would give W, so quantizing W_c at step g adds no error; W_f = W − W_c lies in
[−g/2, g/2] and is quantized at its own step max|W_f| / qmax ≤ g / (2·qmax). The sum of the two
dequantized parts is then W to within about g / (4·qmax) instead of g / 2: roughly 2·qmax times finer,
at twice the weights and multiply-adds of the layer.
"""

from __future__ import annotations

import numpy as np


def split_weight(w: np.ndarray, qmax: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(W_c, W_f) with W_c + W_f = W (to float rounding): W_c on W's INT8 grid, W_f the remainder."""
    axes = tuple(range(1, w.ndim)) if per_channel else None
    amax = np.abs(w).max(axis=axes, keepdims=per_channel)
    step = np.where(amax > 0, amax / qmax, 1.0).astype(w.dtype)
    coarse = (np.round(w / step) * step).astype(w.dtype)
    return coarse, (w - coarse).astype(w.dtype)


def centre_ratio(w: np.ndarray) -> float:
    """max |centre taps| / max |other taps| of an (out, in, k, k) kernel with odd k ≥ 3 (inf when the
    outer taps are all zero): large after RepVGG/MobileOne merge their 1×1 and identity branches."""
    c = w.shape[-1] // 2
    centre = np.abs(w[:, :, c, c]).max()
    outer = np.abs(w).copy()
    outer[:, :, c, c] = 0
    return float(centre / outer.max()) if outer.max() > 0 else float("inf")
