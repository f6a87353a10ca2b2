"""What the byte-level reference LMs share (the MoE LM, RWKV and Mamba): checkpoints in FP16 with their
config, ONNX export with dynamic batch and sequence, and perplexity per byte.

Every byte LM here maps input_ids [batch, sequence] int64 to logits [batch, sequence, 256], has a frozen
config dataclass (`model.config`) with a `seq_len`, and is trained by a script under scripts/.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np


def rms_norm(dim: int):
    """RMSNorm with a learned scale, x / rms(x) · γ (eps 1e-6): the norm of the LLaMA-style byte LMs."""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    return RMSNorm()


def unigram_bits(train: np.ndarray, heldout: np.ndarray) -> float:
    """Bits per byte of the held-out bytes under the training bytes' add-one unigram distribution."""
    counts = np.bincount(train, minlength=256) + 1.0  # add-one: every byte possible
    return float(-np.log2(counts / counts.sum())[heldout].mean())


def save(model, path: Path, extra: dict | None = None) -> None:
    """Weights in FP16 (half the file; the model is defined by them) with the config and notes."""
    import torch

    state = {k: v.detach().cpu().half() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state, **(extra or {})}, path)


def load(path: Path, config_type, build):
    """The checkpoint at `path` as an FP32 torch module in eval mode: `build(config_type(**saved config))`."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build(config_type(**saved["config"]))
    model.load_state_dict({k: v.float() for k, v in saved["state"].items()})
    return model.eval()


def export_onnx(model, path: str | Path, batch: int = 1) -> Path:
    """ONNX of `model` (input_ids [batch, seq] int64 → logits [batch, seq, 256]), batch and sequence length
    dynamic, checked in ORT against torch."""
    import torch

    import onnxq

    ids = torch.zeros(batch, model.config.seq_len, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    return onnxq.export(model, ids, path, input_names=["input_ids"], output_names=["logits"], dynamic_axes=axes,
                        log=lambda *_: None)


def bits_per_byte(run, data: np.ndarray) -> float:
    """Mean next-byte cross-entropy in bits over windows (count × seq_len), every position but the last
    predicting the next; `run(ids) -> logits` (count × seq_len × 256)."""
    total, n = 0.0, 0
    for row in data:
        logits = np.asarray(run(row[None]), dtype=np.float64)[0, :-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        n += len(row) - 1
    return total / n / math.log(2)
