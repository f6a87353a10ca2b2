"""Learned rounding of a block's weights: AdaRound and FlexRound, fitted to the block's float outputs.

AdaRound (Nagel et al., 2020) keeps each weight's step s and learns whether it rounds down or up:
Ŵ = s·clamp(⌊W/s⌋ + h(V), qmin, qmax) with h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, V
started where h(V) equals W/s's fractional part (so the soft start is the float weight). The loss is
‖y_q − y_fp‖² / ‖y_nearest − y_fp‖² + λ·mean(1 − |2h − 1|^β): after a warm-up without the regulariser,
β falls linearly from 20 to 2, which drives every h to 0 or 1; the integers are ⌊W/s⌋ + 1[h ≥ 0.5].

FlexRound (Lee et al., 2023) divides instead: Ŵ = s₁·round(W / (s₁·S₂·s₃·s₄)), with element-wise S₂,
per-output s₃ and (2-D weights) per-input s₄, each exp of a learned log started at 0, and the step s₁
the given scale times exp of a learned log (so it too moves relatively); round passes gradients
straight through. Only s₁ multiplies the integers, so the stored weight stays integers × s₁ in the
scheme's granularity.

Both fit on captured block inputs (axis 0 is the sample axis) against the float block's outputs, with
Adam on the rounding parameters only, in mini-batches drawn with a seeded generator, on CUDA when torch
sees a GPU and on the CPU otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnxq.errors import OnnxqError
from onnxq.quant.reconstruct.fake_quant import WeightQuantizer, along, round_ste
from onnxq.quant.reconstruct.points import WeightPoint
from onnxq.quant.reconstruct.torch_block import BlockModule

ZETA, GAMMA = 1.1, -0.1


class NothingToLearn(OnnxqError):
    pass


class AdaRoundWeight(WeightQuantizer):
    def __init__(self, point: WeightPoint, w: torch.Tensor):
        super().__init__(point)
        ratio = w.detach() / self.expanded_scale(w.shape)
        self.register_buffer("floor", torch.floor(ratio))
        rest = ratio - self.floor  # in [0, 1): h(V) = rest  ⇔  σ(V) = (rest − γ)/(ζ − γ)
        self.v = nn.Parameter(torch.logit((rest - GAMMA) / (ZETA - GAMMA)))
        self.soft = True

    def finish(self) -> None:
        self.soft = False
        self.requires_grad_(False)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def integers(self, w: torch.Tensor | None = None) -> torch.Tensor:
        fmt = self.point.fmt
        return torch.clamp(self.floor + (self.h() >= 0.5).to(self.floor.dtype), fmt.qmin, fmt.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.soft:
            return self.integers() * self.expanded_scale(w.shape)
        fmt = self.point.fmt
        return torch.clamp(self.floor + self.h(), fmt.qmin, fmt.qmax) * self.expanded_scale(w.shape)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - torch.abs(2 * self.h() - 1) ** beta).sum()


class FlexRoundWeight(WeightQuantizer):
    def __init__(self, point: WeightPoint, w: torch.Tensor):
        super().__init__(point)
        self.log_s1 = nn.Parameter(torch.zeros_like(self.base_scale))  # s₁ = given scale · exp(log_s1): exact at 0
        self.log_s2 = nn.Parameter(torch.zeros_like(w))
        self.log_s3 = nn.Parameter(torch.zeros(w.shape[point.out_axis], dtype=w.dtype))
        # per-input factor for matrices; a conv kernel keeps per-output and element-wise only
        self.log_s4 = nn.Parameter(torch.zeros(w.shape[1 - point.out_axis], dtype=w.dtype)) if w.dim() == 2 else None

    def scale(self) -> torch.Tensor:
        return self.base_scale * torch.exp(self.log_s1)

    def _divisor(self, w: torch.Tensor) -> torch.Tensor:
        d = self.expanded_scale(w.shape) * torch.exp(self.log_s2)
        d = d * along(torch.exp(self.log_s3), w.dim(), self.point.out_axis)
        if self.log_s4 is not None:
            d = d * along(torch.exp(self.log_s4), w.dim(), 1 - self.point.out_axis)
        return d

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        fmt = self.point.fmt
        return torch.clamp(torch.round(w / self._divisor(w)), fmt.qmin, fmt.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fmt = self.point.fmt
        return torch.clamp(round_ste(w / self._divisor(w)), fmt.qmin, fmt.qmax) * self.expanded_scale(w.shape)


@dataclass(frozen=True)
class LearnConfig:
    """How rounding is learned. `lr` None: 3e-2 for AdaRound's V, 3e-4 for FlexRound's log-factors (Adam moves every
    element by about lr per step, and a few percent flip a rounding).
    `reg_weight` is AdaRound's λ: the loss is the block's mean squared output error divided by round-to-
    nearest's, plus λ times the regulariser's mean over the block's weights, so λ means the same in every
    block; a large λ makes every h 0 or 1 soon after the warm-up (the default was picked on synthetic
    test blocks only). `warmup` is the fraction of iterations before the regulariser starts, `beta` its
    start and end exponent."""

    method: str = "adaround"  # adaround | flexround
    iterations: int = 1000
    batch_size: int = 32
    lr: float | None = None
    reg_weight: float = 1000.0
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    keep_better: bool = True  # keep round-to-nearest for the block if the learned rounding ends worse


@dataclass
class LearnReport:
    method: str
    iterations: int
    mse_nearest: float  # mean squared output error against float, on all given samples
    mse_learned: float
    kept_nearest: bool
    seconds: float


Progress = Callable[[int, int, float], None]  # (iteration, iterations, loss)


def learn_rounding(module: BlockModule, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None = None,
                   config: LearnConfig = LearnConfig(), progress: Progress | None = None,
                   shared: Sequence[bool] | None = None, fixed_batch: int | None = None) -> LearnReport:
    """Swap each quantized weight's quantizer for a learned one and fit it; the module ends in its final
    (hard-rounded) state, ready for fold_back. Inputs follow `module.block.inputs`, samples along axis 0,
    except those flagged in `shared` (a mask or rotary table every sample uses), which are passed whole.
    `targets` default to the float block on `inputs`. `fixed_batch`: run the block on exactly that many
    samples at a time (samples past a multiple of it are left out), for a block whose shared inputs
    include shape values computed for a batch of that size (a Reshape's target batch)."""
    if config.method not in ("adaround", "flexround"):
        raise OnnxqError(f"unknown learned rounding '{config.method}' (choose adaround or flexround)")
    if not module.quantized_weights:
        raise OnnxqError("the block has no quantized weight to learn")
    start = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    module.to(device)
    xs = [torch.as_tensor(np.asarray(x)).to(device) for x in inputs]
    xs = [x.float() if x.is_floating_point() else x for x in xs]
    shared = list(shared) if shared is not None else [False] * len(xs)
    n = next((x.shape[0] for x, whole in zip(xs, shared) if not whole), None)
    if n is None:
        raise NothingToLearn("every input of the block is shared: there are no samples to learn from")
    if fixed_batch:
        n -= n % fixed_batch
        if n == 0:
            raise NothingToLearn(f"fewer samples than one batch of {fixed_batch}")
        xs = [x if whole else x[:n] for x, whole in zip(xs, shared)]
        targets = None if targets is None else [y[:n] if np.ndim(y) else y for y in map(np.asarray, targets)]
    at_once = fixed_batch or EVAL_BATCH
    ys = _targets(module, xs, shared, targets, at_once)
    if all(y is None for y in ys):
        raise NothingToLearn("the block has no per-sample float output to reconstruct")
    mse_nearest = _mse(module, xs, shared, ys, at_once)
    nearest = {name: module.quantizer(name) for name in module.quantized_weights}

    cls = AdaRoundWeight if config.method == "adaround" else FlexRoundWeight
    # built on the CPU, where the points' scales live, then moved with their parameters
    learned = {name: cls(nearest[name].point, module.weight(name).detach().cpu()).to(device) for name in nearest}
    for name, quantizer in learned.items():
        module.set_quantizer(name, quantizer)
    params = [p for q in learned.values() for p in q.parameters() if p.requires_grad]
    n_weights = sum(module.weight(name).numel() for name in learned)
    lr = config.lr or (3e-2 if config.method == "adaround" else 3e-4)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    every = max(1, config.iterations // 100)
    batch = min(config.batch_size, n)
    # a fixed batch size: the mini-batch is gathered from that many samples at a time (gradients summed)
    chunk = fixed_batch or batch
    chunks = max(1, -(-batch // chunk))
    for step in range(config.iterations):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(chunks):
            index = torch.randint(0, n, (chunk,), generator=generator).to(device)
            outs = module(*[x if whole else x.index_select(0, index) for x, whole in zip(xs, shared)])
            # the output error relative to round-to-nearest's, so that reg_weight means the same in every block
            error = sum(((o - y.index_select(0, index)) ** 2).mean() for o, y in zip(outs, ys) if y is not None)
            (error / (max(mse_nearest, 1e-30) * chunks)).backward()
        loss = error / max(mse_nearest, 1e-30)
        if config.method == "adaround":
            beta = _beta(step, config)
            if beta is not None:
                regularizer = config.reg_weight * sum(q.regularizer(beta) for q in learned.values()) / n_weights
                regularizer.backward()
                loss = loss + regularizer
        optimizer.step()
        if progress is not None and (step % every == 0 or step == config.iterations - 1):
            progress(step + 1, config.iterations, float(loss.detach()))
    for quantizer in learned.values():
        quantizer.finish()
    mse_learned = _mse(module, xs, shared, ys, at_once)
    kept = config.keep_better and mse_learned > mse_nearest
    if kept:
        for name, quantizer in nearest.items():
            module.set_quantizer(name, quantizer)
    module.to("cpu")
    return LearnReport(config.method, config.iterations, mse_nearest, mse_learned, kept, time.perf_counter() - start)


def _beta(step: int, config: LearnConfig) -> float | None:
    """AdaRound's exponent at `step`: None during the warm-up, then linear from beta[0] to beta[1]."""
    warm = int(config.warmup * config.iterations)
    if step < warm:
        return None
    t = (step - warm) / max(1, config.iterations - warm)
    return config.beta[0] + (config.beta[1] - config.beta[0]) * t


EVAL_BATCH = 64  # samples per forward when computing targets and errors (no gradients kept)


@torch.no_grad()
def _targets(module: BlockModule, xs, shared, targets, at_once: int = EVAL_BATCH) -> list[torch.Tensor | None]:
    """The float block's outputs on all samples; None for an output that is not a per-sample float tensor
    (a shape computed for the later layers, a table every sample shares): quantization cannot move those."""
    if targets is not None:
        return [torch.as_tensor(np.asarray(y, dtype=np.float32)).to(xs[0].device) for y in targets]
    module.quantized = False
    try:  # (samples in the batch, the block's outputs on it)
        per_batch = [(next(x.shape[0] for x, whole in zip(batch, shared) if not whole), module(*batch))
                     for _, batch in _batches(xs, shared, at_once)]
    finally:
        module.quantized = True
    out = []
    for i, first in enumerate(per_batch[0][1]):
        batched = [outs[i] for _, outs in per_batch]
        compare = first.is_floating_point() and all(o.dim() > 0 and o.shape[0] == count
                                                    for (count, _), o in zip(per_batch, batched))
        out.append(torch.cat(batched) if compare else None)
    return out


def _batches(xs, shared, at_once: int = EVAL_BATCH):
    n = next(x.shape[0] for x, whole in zip(xs, shared) if not whole)
    for i in range(0, n, at_once):
        yield slice(i, i + at_once), [x if whole else x[i:i + at_once] for x, whole in zip(xs, shared)]


@torch.no_grad()
def _mse(module: BlockModule, xs, shared, ys, at_once: int = EVAL_BATCH) -> float:
    total, count = 0.0, 0
    for rows, batch in _batches(xs, shared, at_once):
        for o, y in zip(module(*batch), ys):
            if y is None:
                continue
            total += float(((o - y[rows]) ** 2).sum())
            count += o.numel()
    return total / max(count, 1)


def block_output_mse(module: BlockModule, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                     shared: Sequence[bool] | None = None) -> float:
    """Mean squared error of the module (as it is now) against `targets`, on the CPU."""
    xs = [torch.as_tensor(np.asarray(x)) for x in inputs]
    xs = [x.float() if x.is_floating_point() else x for x in xs]
    ys = [torch.as_tensor(np.asarray(y, dtype=np.float32)) for y in targets]
    return _mse(module, xs, list(shared) if shared is not None else [False] * len(xs), ys)
