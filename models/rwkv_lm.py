"""A small RWKV-4 language model, byte-level, trained from scratch (scripts/train_recurrent.py).

Blocks as in RWKV-4: pre-LayerNorm, then *time mixing* and *channel mixing*, each with a residual Add.

* token shift: every mixing layer reads x_t and x_{t-1} (zeros before the first byte) and interpolates
  them per channel with learned μ vectors: x_mix = x·μ + x_prev·(1 − μ);
* time mixing: k, v, r = K·x_k, V·x_v, R·x_r; the WKV average with a learned per-channel decay
  w = −exp(decay) < 0 and bonus u for the current token,

      wkv_t = (Σ_{i<t} e^{(t−1−i)·w + k_i}·v_i + e^{u + k_t}·v_t) / (Σ_{i<t} e^{(t−1−i)·w + k_i} + e^{u + k_t}),

  then out = O·(σ(r) ⊙ wkv);
* channel mixing: out = σ(R·x_r) ⊙ V·relu(K·x_k)².

The recurrence is written in its parallel form: for each channel, wkv_t is a softmax over positions
i ≤ t of the logits k_i + D[t, i] (D = (t−1−i)·w below the diagonal, u on it, −∞ above) applied to v.
That exports to plain ONNX (Range, Mul, Where, Softmax, ReduceSum) for any sequence length, which ONNX
Runtime and TensorRT both run; it costs O(T²·C) per layer instead of the O(T·C) of the recurrent form
(fine for windows of a few hundred bytes, and what a prompt-processing engine does anyway). A streaming
decoder would export the single-step form (state in, state out) instead; the weights are the same.

Text and windows are those of the MoE LM (`moe_lm.corpus`, `moe_lm.windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnxq_models import byte_lm

CHECKPOINT = Path(__file__).parent / "checkpoints" / "rwkv_lm.pt"


@dataclass(frozen=True)
class RWKVConfig:
    vocab: int = 256
    dim: int = 256
    layers: int = 6
    ffn: int = 1024  # channel mixing's hidden width
    seq_len: int = 128  # training windows; the parallel form runs any length


def build(config: RWKVConfig):
    """The torch module for `config` (torch is imported here: this package is optional)."""
    import torch
    from torch import nn

    def shift(x):  # x_{t-1}, zeros at t = 0
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    def mix(x, prev, mu):
        return x * mu + prev * (1 - mu)

    def ramp(c, layer, power):  # RWKV-4's initial μ: later channels and deeper layers mix in less of x_{t-1}
        share = 1 - layer / max(1, c.layers)
        return torch.pow(torch.arange(c.dim) / c.dim, share * power)

    class TimeMix(nn.Module):
        def __init__(self, c, layer):
            super().__init__()
            self.mix_k, self.mix_v, self.mix_r = (nn.Parameter(ramp(c, layer, p)) for p in (1.0, 1.0, 0.5))
            speed = torch.arange(c.dim) / max(1, c.dim - 1)
            self.decay = nn.Parameter(-5 + 8 * speed ** (0.7 + 1.3 * layer / max(1, c.layers - 1)))
            self.first = nn.Parameter(torch.full((c.dim,), -1.2) + 0.5 * ((torch.arange(c.dim) % 3) - 1))
            self.key, self.value, self.receptance, self.output = (nn.Linear(c.dim, c.dim, bias=False) for _ in range(4))

        def forward(self, x):
            prev = shift(x)
            k = self.key(mix(x, prev, self.mix_k))
            v = self.value(mix(x, prev, self.mix_v))
            r = torch.sigmoid(self.receptance(mix(x, prev, self.mix_r)))
            return self.output(r * self.wkv(k, v))

        def wkv(self, k, v):
            t = k.shape[1]
            pos = torch.arange(t, device=k.device)
            distance = (pos[:, None] - pos[None, :] - 1).to(k.dtype)  # t − 1 − i
            logits = distance[..., None] * -torch.exp(self.decay)  # [T, T, C]
            logits = torch.where((pos[:, None] == pos[None, :])[..., None], self.first, logits)
            logits = logits.masked_fill((pos[None, :] > pos[:, None])[..., None], float("-inf"))
            weights = torch.softmax(logits[None] + k[:, None], dim=2)  # [B, T(t), T(i), C]
            return (weights * v[:, None]).sum(2)

    class ChannelMix(nn.Module):
        def __init__(self, c, layer):
            super().__init__()
            self.mix_k, self.mix_r = (nn.Parameter(ramp(c, layer, 1.0)) for _ in range(2))
            self.key = nn.Linear(c.dim, c.ffn, bias=False)
            self.value = nn.Linear(c.ffn, c.dim, bias=False)
            self.receptance = nn.Linear(c.dim, c.dim, bias=False)

        def forward(self, x):
            prev = shift(x)
            k = torch.relu(self.key(mix(x, prev, self.mix_k))) ** 2
            return torch.sigmoid(self.receptance(mix(x, prev, self.mix_r))) * self.value(k)

    class Block(nn.Module):
        def __init__(self, c, layer):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
            self.time, self.channel = TimeMix(c, layer), ChannelMix(c, layer)

        def forward(self, x):
            x = x + self.time(self.ln1(x))
            return x + self.channel(self.ln2(x))

    class RWKVLM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embed = nn.Embedding(c.vocab, c.dim)
            self.ln0 = nn.LayerNorm(c.dim)
            self.blocks = nn.ModuleList(Block(c, i) for i in range(c.layers))
            self.ln_out = nn.LayerNorm(c.dim)
            self.head = nn.Linear(c.dim, c.vocab, bias=False)
            nn.init.uniform_(self.embed.weight, -1e-4, 1e-4)  # RWKV's small embedding init (ln0 rescales it)

        def forward(self, input_ids):
            x = self.ln0(self.embed(input_ids))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_out(x))

    return RWKVLM(config)


def load(path: Path | None = None):
    """The committed checkpoint as an FP32 torch module in eval mode."""
    return byte_lm.load(path or CHECKPOINT, RWKVConfig, build)
