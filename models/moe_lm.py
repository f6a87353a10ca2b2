"""A small mixture-of-experts language model (and its dense twin), byte-level, trained from scratch.

Shape: LLaMA-style pre-norm decoder blocks (RMSNorm, causal multi-head attention, SwiGLU), with the
MLP replaced by a top-2-of-8 routed mixture of SwiGLU experts (the Mixtral / Qwen-MoE layout). The
dense twin has one SwiGLU MLP as wide as two experts, so both compute the same active parameters per
token. Tokens are bytes (vocabulary 256): no tokenizer to ship, and bits per byte compare with any
byte model.

Routing is written densely: every expert runs on every token and the outputs are summed with the
gate weights, which are the router's softmax probabilities kept for each token's top-2 experts
(renormalised) and 0 elsewhere (on an exact tie between the k-th and the next probability both are
kept: measure zero in float32). That costs 4× the expert FLOPs of a sparse kernel at this size, but
exports to plain ONNX (TopK, comparison, Where, MatMul, Mul, Add) that ONNX Runtime and TensorRT run
and whose expert MatMuls quantize like any other; a gather/scatter form would need data-dependent
shapes. Away from such ties the gate weights are exactly those of sparse routing, so the model computes the
same function.

Text (packaged, see corpus()): the gensim enwiki sample's evaluation articles split in two (even
positions train, odd positions are the held-out text), plus Debian's `fortunes` for training;
quantization calibration uses the enwiki calibration articles, disjoint from both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxq_models import byte_lm

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
FORTUNES = Path("/usr/share/games/fortunes")


@dataclass(frozen=True)
class MoEConfig:
    vocab: int = 256
    dim: int = 192
    layers: int = 4
    heads: int = 4
    experts: int = 8  # 0: the dense twin
    top_k: int = 2
    expert_ffn: int = 128  # the dense MLP is top_k × this wide
    seq_len: int = 256


def corpus(split: str) -> bytes:
    """'train' (enwiki even-position evaluation articles + Debian fortunes), 'heldout' (enwiki odd-position
    evaluation articles) or 'calib' (enwiki calibration articles), as UTF-8 bytes, articles joined by
    blank lines."""
    from onnxq_models.text_data import wiki_articles

    if split == "calib":
        texts = [text for _, text in wiki_articles("calib")]
    else:
        articles = [text for _, text in wiki_articles("eval")]
        texts = articles[0::2] if split == "train" else articles[1::2]
        if split == "train":
            texts += _fortunes()
        elif split != "heldout":
            raise ValueError(f"unknown split {split!r} (train, heldout, calib)")
    return "\n\n".join(texts).encode("utf-8")


def _fortunes() -> list[str]:
    if not FORTUNES.is_dir():
        raise FileNotFoundError("training text: Debian's fortunes package is not installed (apt-get install fortunes)")
    files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and p.name != "off")
    return [p.read_text(encoding="utf-8", errors="ignore").replace("\n%\n", "\n\n") for p in files]


def windows(data: bytes, count: int, seq_len: int = 256) -> np.ndarray:
    """`count` non-overlapping windows (count × seq_len int64) spread evenly over `data`."""
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    available = len(ids) // seq_len
    if count > available:
        raise ValueError(f"{available} windows of {seq_len} bytes available, {count} asked")
    starts = np.linspace(0, (available - 1) * seq_len, count).astype(int) // seq_len * seq_len
    return np.stack([ids[s:s + seq_len] for s in starts])


def build(config: MoEConfig):
    """The torch module for `config` (torch is imported here: this package is optional)."""
    import torch
    from torch import nn

    class SwiGLU(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)

        def forward(self, x):
            return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.heads, self.head_dim = c.heads, c.dim // c.heads
            self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim, bias=False) for _ in range(4))
            self.register_buffer("causal", torch.ones(c.seq_len, c.seq_len, dtype=torch.bool).triu(1), persistent=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(self.causal[:t, :t], torch.finfo(scores.dtype).min)
            return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))

    class MoE(nn.Module):
        """Top-k of E SwiGLU experts, written densely (see the module docstring)."""

        def __init__(self, c):
            super().__init__()
            self.top_k = c.top_k
            self.router = nn.Linear(c.dim, c.experts, bias=False)
            self.experts = nn.ModuleList(SwiGLU(c.dim, c.expert_ffn) for _ in range(c.experts))
            self.last_probs = None  # router probabilities of the last call (load balancing, reports)

        def forward(self, x):
            probs = self.router(x).softmax(-1)
            kth = probs.topk(self.top_k, dim=-1).values[..., -1:]
            gates = torch.where(probs >= kth, probs, torch.zeros_like(probs))
            gates = gates / gates.sum(-1, keepdim=True)
            self.last_probs, self.last_gates = probs, gates
            out = 0
            for e, expert in enumerate(self.experts):
                out = out + gates[..., e:e + 1] * expert(x)
            return out

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.attn_norm, self.mlp_norm = byte_lm.rms_norm(c.dim), byte_lm.rms_norm(c.dim)
            self.attn = Attention(c)
            self.mlp = MoE(c) if c.experts else SwiGLU(c.dim, c.top_k * c.expert_ffn)

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    class MoELM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embed = nn.Embedding(c.vocab, c.dim)
            self.position = nn.Parameter(torch.zeros(c.seq_len, c.dim))
            self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
            self.norm = byte_lm.rms_norm(c.dim)
            self.head = nn.Linear(c.dim, c.vocab, bias=False)
            nn.init.normal_(self.position, std=0.02)

        def forward(self, input_ids):
            x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

        def routers(self):
            return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    return MoELM(config)


def checkpoint_path(dense: bool = False) -> Path:
    return CHECKPOINT_DIR / ("dense_lm.pt" if dense else "moe_lm.pt")


def save(model, path: Path, extra: dict | None = None) -> None:
    byte_lm.save(model, path, extra)


def load(dense: bool = False, path: Path | None = None):
    """The committed checkpoint as an FP32 torch module in eval mode."""
    return byte_lm.load(path or checkpoint_path(dense), MoEConfig, build)


export_onnx = byte_lm.export_onnx
bits_per_byte = byte_lm.bits_per_byte
