"""A small Mamba language model, byte-level, trained from scratch (scripts/train_recurrent.py).

Pre-RMSNorm residual blocks, each one Mamba mixer:

    x = in_x(h), z = in_z(h)                       in-projection (two linears: states and gate)
    x = silu(causal depthwise conv1d(x))           kernel 4
    B, C = x_proj_b(x), x_proj_c(x)                selective: input-dependent, [T, N]
    Δ = softplus(dt_proj(x))                       one step size per head, [T, H]
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·x_t,  y_t = C_t·h_t + D ⊙ x_t      the selective scan
    out = out_proj(y ⊙ silu(z))                    gate, out-projection

A is one negative scalar per head (the Mamba-2 "SSD" restriction of Mamba's diagonal A), so the scan
has a parallel form without materialising the [T, T, channels, N] decay tensor:

    y = (L ⊙ C·Bᵀ) · (Δ ⊙ x) + D ⊙ x,   L[t, i] = exp(Σ_{j=i+1..t} Δ_j·A) for i ≤ t, 0 above

per head, where the cumulative sum is a CumSum and the mask a Where. That exports to plain ONNX
(MatMul, CumSum, Exp, Where) that ONNX Runtime and TensorRT run for any sequence length, at O(T²) per
head like attention; a streaming decoder would export the single-step form (state in, state out)
instead, with the same weights. The structure MambaQuant works on is intact: the residual stream read
through RMSNorm by in_x/in_z, the gated SiLU before out_proj, and the scan's two MatMuls.

Text and windows are those of the MoE LM (`moe_lm.corpus`, `moe_lm.windows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from onnxq_models import byte_lm

CHECKPOINT = Path(__file__).parent / "checkpoints" / "mamba_lm.pt"


@dataclass(frozen=True)
class MambaConfig:
    vocab: int = 256
    dim: int = 256
    layers: int = 6
    expand: int = 2
    state: int = 16
    heads: int = 8
    conv: int = 4
    seq_len: int = 128  # training windows; the parallel form runs any length


def build(config: MambaConfig):
    """The torch module for `config` (torch is imported here: this package is optional)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Mixer(nn.Module):
        def __init__(self, c):
            super().__init__()
            inner = c.expand * c.dim
            self.heads, self.head_dim = c.heads, inner // c.heads
            self.in_x, self.in_z = nn.Linear(c.dim, inner, bias=False), nn.Linear(c.dim, inner, bias=False)
            self.conv = nn.Conv1d(inner, inner, c.conv, groups=inner, padding=c.conv - 1)
            self.x_proj_b, self.x_proj_c = nn.Linear(inner, c.state, bias=False), nn.Linear(inner, c.state, bias=False)
            self.dt_proj = nn.Linear(inner, c.heads)
            step = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), c.heads))  # Mamba's Δ init range
            with torch.no_grad():
                self.dt_proj.bias.copy_(step + torch.log(-torch.expm1(-step)))  # softplus⁻¹(step)
            self.a_log = nn.Parameter(torch.log(torch.linspace(1, 16, c.heads)))
            self.skip = nn.Parameter(torch.ones(inner))  # D
            self.out_proj = nn.Linear(inner, c.dim, bias=False)

        def forward(self, h):
            t = h.shape[1]
            x, z = self.in_x(h), self.in_z(h)
            x = F.silu(self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2))
            return self.out_proj(self.scan(x) * F.silu(z))

        def scan(self, x):
            b, t, inner = x.shape
            dt = F.softplus(self.dt_proj(x))  # [B, T, H]
            cum = torch.cumsum(dt * -torch.exp(self.a_log), dim=1).transpose(1, 2)  # [B, H, T]
            pos = torch.arange(t, device=x.device)
            upper = pos[None, :] > pos[:, None]
            decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")))
            scores = self.x_proj_c(x) @ self.x_proj_b(x).transpose(1, 2)  # C_t·B_i, [B, T, T]
            steps = (x.view(b, t, self.heads, self.head_dim) * dt[..., None]).transpose(1, 2)  # Δ ⊙ x, [B, H, T, P]
            y = (decay * scores[:, None]) @ steps
            return y.transpose(1, 2).reshape(b, t, inner) + x * self.skip

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm, self.mixer = byte_lm.rms_norm(c.dim), Mixer(c)

        def forward(self, x):
            return x + self.mixer(self.norm(x))

    class MambaLM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embed = nn.Embedding(c.vocab, c.dim)
            self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
            self.norm = byte_lm.rms_norm(c.dim)
            self.head = nn.Linear(c.dim, c.vocab, bias=False)

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return MambaLM(config)


def load(path: Path | None = None):
    """The committed checkpoint as an FP32 torch module in eval mode."""
    return byte_lm.load(path or CHECKPOINT, MambaConfig, build)
