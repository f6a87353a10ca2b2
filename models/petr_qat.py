"""Quantization-aware fine-tuning for PETR-tiny: per-tensor INT8 fake quantization of every layer input.

Post-training W8A8 of PETR-tiny stops about 3 mAP points short of FP32 even with the PE folded away
(scripts/results/petr.md): the loss is spread over every per-tensor activation quantizer, each costing
a fraction of a point (keeping any one category in float recovers 0.3 to 1.6), so no single rewrite
recovers it. Fine-tuning with the quantizer in the loop lets the weights adapt to it. QFPE needs fine-tuning anyway (FQ-PETR
fine-tunes it for a full schedule), so this is one more stage of that fine-tune, not a new cost.

What is simulated: the input of every nn.Linear and nn.Conv2d (what onnxq's W8A8 recipes quantize per
tensor) goes through symmetric INT8 fake quantization, x̂ = s·clamp(round(x/s), −128, 127), with
s = amax/127 and amax an exponential moving average of the batch's |x| maximum; gradients pass
straight through inside the range (torch.fake_quantize_per_tensor_affine). With `weights`, the
weights of Linear layers and of biased (not BatchNorm-folded) convs are fake-quantized per tensor too.
The checkpoint is an ordinary float PETR: the hooks and parametrizations hold the only state and are
removed before saving.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def fake_int8(x: torch.Tensor, amax: torch.Tensor, qmin: int) -> torch.Tensor:
    """Symmetric per-tensor INT8 fake quantization at scale amax/127, straight-through gradients."""
    scale = (amax.detach().float() / 127).clamp_min(1e-12).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros(1, dtype=torch.int32, device=x.device), qmin, 127)


class InputFakeQuant:
    """Forward pre-hook: per-tensor INT8 fake quantization of a module's first input (activation range
    −128..127, as the Q/DQ activations), scale from an EMA of the batch |max|."""

    def __init__(self, momentum: float = 0.99):
        self.momentum = momentum
        self.amax: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training or self.amax is None:
            batch_max = x.detach().abs().amax().float()
            self.amax = batch_max if self.amax is None else self.momentum * self.amax + (1 - self.momentum) * batch_max
        return (fake_int8(x, self.amax, -128), *args[1:])


class WeightFakeQuant(nn.Module):
    """Parametrization: per-tensor INT8 fake quantization of a weight (−127..127, scale from its |max|)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_int8(w, w.abs().amax(), -127)


class Attached(NamedTuple):
    hooks: list
    parametrized: list[nn.Module]


def attach(model: nn.Module, weights: bool = False) -> Attached:
    """Fake-quantize the inputs of every Linear and Conv2d of `model` (and with `weights` the weights of
    those whose weight is deployed as it is: Linear, and Conv2d with a bias, i.e. not folded with a
    BatchNorm)."""
    from torch.nn.utils import parametrize

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hooks = [m.register_forward_pre_hook(InputFakeQuant()) for m in layers]
    parametrized = [m for m in layers if weights and m.bias is not None]
    for m in parametrized:
        parametrize.register_parametrization(m, "weight", WeightFakeQuant())
    return Attached(hooks, parametrized)


def detach(attached: Attached) -> None:
    """Remove the hooks and weight parametrizations: the model is an ordinary float model again."""
    from torch.nn.utils import parametrize

    for hook in attached.hooks:
        hook.remove()
    for m in attached.parametrized:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
