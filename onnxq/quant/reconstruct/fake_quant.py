"""Fake quantization in torch, with the straight-through estimator.

DQ(Q(x)) = s·(clamp(round(x/s) + z, qmin, qmax) − z), computed as ONNX Runtime does in float32 (round
half to even, like QuantizeLinear). The gradient treats round as the identity (STE) and clamp as it is,
so values past the range get no gradient. Weight scales come in quantize_weight's layout and are
broadcast here: () per tensor, (C,) per channel along `axis`, weight-rank blocks of `block_size` along
the input axis (the axis other than `axis`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from onnxq.quant.reconstruct.points import WeightPoint


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def expand_scale(scale: torch.Tensor, shape: tuple, axis: int | None, block_size: int = 0) -> torch.Tensor:
    """A weight scale (quantize_weight's layout) broadcastable against a weight of `shape`."""
    if block_size:
        return torch.repeat_interleave(scale, block_size, dim=1 - axis)
    if axis is None:
        return scale.reshape([1] * len(shape))
    return scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def along(vector: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """A 1-D tensor shaped to broadcast along `axis` of a rank-`rank` tensor."""
    return vector.reshape([-1 if i == axis else 1 for i in range(rank)])


class WeightQuantizer(nn.Module):
    """Maps a float weight to its dequantized value, and tells the integers and scale it stands for.

    `integers(w)` and `scale()` are what fold-back stores; forward must equal integers·scale (broadcast)
    when the quantizer is in its final (hard) state, so the learned block and the folded graph agree."""

    def __init__(self, point: WeightPoint):
        super().__init__()
        self.point = point
        self.register_buffer("base_scale", torch.from_numpy(np.asarray(point.scale, dtype=np.float32).copy()))

    def scale(self) -> torch.Tensor:
        return self.base_scale

    def expanded_scale(self, shape) -> torch.Tensor:
        return expand_scale(self.scale(), tuple(shape), self.point.axis, self.point.block_size)

    def finish(self) -> None:
        """Freeze in the final state (learned quantizers leave their soft training form here)."""
        self.requires_grad_(False)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        fmt = self.point.fmt
        return torch.clamp(torch.round(w / self.expanded_scale(w.shape)), fmt.qmin, fmt.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fmt = self.point.fmt
        return fake_quant(w, self.expanded_scale(w.shape), 0, fmt.qmin, fmt.qmax)
