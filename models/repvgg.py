"""A small RepVGG for Fashion-MNIST: trained with 3×3, 1×1 and identity branches, deployed with each
block's branches merged into one 3×3 convolution (Ding et al., 2021), the form a user exports.

Merging folds each branch's BatchNorm into its kernel and adds the 1×1 kernel and the identity (as a
3×3 kernel with a one at the centre of its own channel) into the centre taps, so the deployed kernels
have large centre taps beside small outer ones: the weight-range problem coarse & fine weight
splitting addresses. The trained model is derived data: `cached_onnx()` trains it once (a few
minutes on CPU, seeded) and caches the merged ONNX export under .cache/models/.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

# (output channels, stride) per block, on 1×28×28 inputs
STAGES = [(16, 2), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)]


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.merged: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return torch.relu(self.merged(x))
        y = self.dense(x) + self.pointwise(x)
        return torch.relu(y + self.identity(x) if self.identity is not None else y)

    def merge(self) -> None:
        """Replace the branches by one 3×3 convolution computing the same function (eval-mode BN)."""
        conv = self.dense[0]
        kernel, bias = _fold(conv.weight, self.dense[1])
        k1, b1 = _fold(self.pointwise[0].weight, self.pointwise[1])
        kernel = kernel + nn.functional.pad(k1, [1, 1, 1, 1])
        bias = bias + b1
        if self.identity is not None:
            eye = torch.zeros_like(kernel)
            eye[torch.arange(kernel.shape[0]), torch.arange(kernel.shape[0]), 1, 1] = 1.0
            ki, bi = _fold(eye, self.identity)
            kernel, bias = kernel + ki, bias + bi
        self.merged = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.merged.weight.data, self.merged.bias.data = kernel.detach(), bias.detach()
        del self.dense, self.pointwise, self.identity
        self.identity = None


def _fold(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class RepVGG(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        blocks, cin = [], 1
        for cout, stride in STAGES:
            blocks.append(RepVGGBlock(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))

    def merge(self) -> RepVGG:
        for block in self.blocks:
            block.merge()
        return self


def train(epochs: int = 4, seed: int = 0, log=print) -> RepVGG:
    from onnxq_models import fashion_mnist

    torch.manual_seed(seed)
    images, labels = fashion_mnist.load("train")
    model = RepVGG()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(images) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    order_rng = np.random.default_rng(seed)
    start = time.time()
    for epoch in range(epochs):
        order = order_rng.permutation(len(images))
        model.train()
        for i in range(len(images) // 128):
            batch = order[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(model(torch.from_numpy(images[batch])), torch.from_numpy(labels[batch]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        log(f"repvgg epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def export_onnx(model: RepVGG, path: str | Path) -> Path:
    """The merged model to ONNX (dynamic batch), checked against the branched model on test images."""
    from onnxq_models import fashion_mnist

    images = torch.from_numpy(fashion_mnist.load("train")[0][:64])  # the test split stays for evaluation only
    with torch.no_grad():
        branched = model(images)
        model.merge()
        merged = model(images)
        if not torch.allclose(branched, merged, atol=1e-4, rtol=1e-4):
            raise RuntimeError("merging the branches changed the outputs")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (images[:1],), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def cached_onnx(epochs: int = 4) -> Path:
    """The trained, merged RepVGG as ONNX (trained and exported on first use)."""
    from onnxq_models.cache import cache_dir

    path = cache_dir("models") / f"repvgg_fmnist_e{epochs}.onnx"
    if not path.exists():
        export_onnx(train(epochs), path.with_suffix(".tmp.onnx")).rename(path)
    return path
