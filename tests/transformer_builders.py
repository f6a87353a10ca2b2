"""Tiny transformers built in the tests: a Llama-like decoder (RMSNorm, RoPE, GQA, SwiGLU), a BERT-like
encoder (post-LN LayerNorm, GELU), and a GPT-like pre-LN LayerNorm decoder, exported with torch.onnx
(legacy exporter, and dynamo where asked). Random weights, with a few outlier channels planted so the
smoothing and rotation passes have something to do."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

VOCAB = 96
SEQ = 12


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def tiny_llama(*, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, attention="eager"):
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation=attention, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm scales and a few outlier channels
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
                p[:2] *= 8
        model.model.embed_tokens.weight[:, 3] *= 10
    return model


def tiny_bert(*, hidden=64, layers=2, heads=4, intermediate=128, attention="eager"):
    torch = _torch()
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=64, attn_implementation=attention)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(torch.rand_like(p) + 0.5)
                p[5] *= 12
            elif "LayerNorm.bias" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def tiny_gpt(*, hidden=64, layers=2, heads=4):
    """Pre-LN decoder with affine LayerNorm, GELU MLP and biases (GPT-2 layout, written here)."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

        def forward(self, x, mask):
            b, s, _ = x.shape
            h = self.ln1(x)
            split = lambda t: t.view(b, s, heads, hidden // heads).transpose(1, 2)
            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            scores = q @ k.transpose(2, 3) / (hidden // heads) ** 0.5 + mask
            a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, hidden)
            x = x + self.o(a)
            return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, VOCAB, bias=False)

        def forward(self, input_ids):
            s = input_ids.shape[1]
            mask = torch.triu(torch.full((s, s), -1e9), 1)
            x = self.emb(input_ids)
            for blk in self.blocks:
                x = blk(x, mask)
            return self.head(self.ln(x))

    model = GPT().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif "ln" in name and name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def export(model, path: Path, kind: str, *, dynamo: bool = False, opset: int | None = None) -> Path:
    """Export `model` ('llama' | 'bert' | 'gpt') with dynamic batch and sequence axes (opset 17 for the
    legacy exporter and 18 for dynamo unless given)."""
    torch = _torch()
    feeds = feeds_for(kind, 2)
    names = list(feeds)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            if kind == "gpt":
                return self.m(input_ids)
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = self.m(**{k: v for k, v in given.items() if k in names})
            return out.logits if kind == "llama" else out.last_hidden_state

    out_name = "logits" if kind in ("llama", "gpt") else "last_hidden_state"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
            program = torch.onnx.export(Wrapped(model), args, dynamo=True, opset_version=opset or 18, input_names=names,
                                        output_names=[out_name],
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names}, optimize=True)
            program.save(str(path))
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in [*names, out_name]}
            torch.onnx.export(Wrapped(model), args, str(path), dynamo=False, opset_version=opset or 17, input_names=names,
                              output_names=[out_name], dynamic_axes=axes, do_constant_folding=True)
    return path


def feeds_for(kind: str, n: int, seed: int = 0, seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, seq)).astype(np.int64)
    if kind == "gpt":
        return {"input_ids": ids}
    mask = np.ones_like(ids)
    if kind == "bert":
        mask[1:, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {"input_ids": ids, "attention_mask": mask}
