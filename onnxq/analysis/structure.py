"""Structure recognition on exported transformer graphs: by pattern, never by node names.

`analyse(model)` returns a `Structure` of plain dataclasses that passes read, then edit through
onnxq.ir.linear and onnxq.ir.graph:

| dataclass | what it holds | found in |
|---|---|---|
| `Linear` | MatMul/Gemm with a constant 2-D weight, plus its bias (Gemm C or a following Add of a 1-D constant) | linears |
| `Norm` | LayerNormalization / RMSNormalization / SimplifiedLayerNormalization ops and the decomposed RMS and LayerNorm forms; γ and β if present | norms |
| `Attention` | Q/K/V projections, the per-head paths, QKᵀ MatMul, Softmax, PV MatMul, output projection; heads, KV heads (GQA), head dim, RoPE | attention |
| `MLP` | SwiGLU (SiLU(gate)·up → down), GeGLU, or a plain act MLP (GELU in Erf or op form, ReLU, SiLU) | mlp |
| `MoE` | a router (linear → top-k), its experts (MLPs whose outputs are weighted by per-token gates) and the summed output, in the dense form | moe |
| `MambaMixer`, `RWKVMix` | recurrent LM blocks: Mamba's in-projections, conv1d, scan and gated SiLU before out_proj; RWKV's token-shift mixes feeding key/value/receptance, time and channel mixing | recurrent |
| `Embedding`, `ResidualStream` | token embedding Gathers; the stream through every residual Add, its writers and readers, the final norm, the LM head, and why a stream rotation would not be exact | residual |

Three steps are kept apart, as in onnxscript's rewriter: *match* (a pattern or a graph walk finds
candidate nodes), *check* (conditions on constants, shapes and readers; a failed check is recorded in
`Structure.rejected` with the reason), and *rewrite* (done by the passes, never here). Norm and GELU
subgraphs, and the NaN guard that sdpa exports put after the softmax, are onnxscript patterns with a
check; attention, MLPs and the residual stream are walks over the IR, since their interiors (RoPE,
GQA repeat, dynamic reshapes) vary too much between exporters for a fixed pattern. The recognisers
accept what the TorchScript and the dynamo exporters write, and their onnxscript / ORT optimized forms.

    s = analyse(model)
    for norm in s.norms: ...              # every LayerNorm/RMSNorm, fused or decomposed
    for att in s.attentions: att.softmax  # the Softmax node of each attention
    find_norms(model), find_softmaxes(model)   # the cheap entry points
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.analysis.attention import Attention, find_attentions, find_softmaxes
from onnxq.analysis.linears import find_linears
from onnxq.analysis.matching import Rejection
from onnxq.analysis.mlp import MLP, find_mlps
from onnxq.analysis.moe import MoE, find_moes
from onnxq.analysis.norms import Norm, find_norms
from onnxq.analysis.recurrent import MambaMixer, RWKVMix, find_mamba_mixers, find_rwkv_mixes
from onnxq.analysis.residual import Embedding, ResidualStream, find_embeddings, find_residual_stream
from onnxq.ir.linear import Linear

__all__ = [
    "MLP",
    "Attention",
    "Embedding",
    "Linear",
    "MambaMixer",
    "MoE",
    "Norm",
    "RWKVMix",
    "Rejection",
    "ResidualStream",
    "Structure",
    "analyse",
    "find_linears",
    "find_norms",
    "find_softmaxes",
    "is_transformer",
]


@dataclass
class Structure:
    linears: list[Linear] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    mlps: list[MLP] = field(default_factory=list)
    moes: list[MoE] = field(default_factory=list)
    mamba_mixers: list[MambaMixer] = field(default_factory=list)
    rwkv_mixes: list[RWKVMix] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)
    stream: ResidualStream | None = None
    lm_head: Linear | None = None
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def is_transformer(self) -> bool:
        return bool(self.attentions) and bool(self.norms)

    @property
    def recurrent_family(self) -> str | None:
        """"mamba" or "rwkv" when the graph's blocks are those recurrent LM blocks (and no attention)."""
        if self.attentions:
            return None
        if self.mamba_mixers:
            return "mamba"
        if any(m.kind == "time" for m in self.rwkv_mixes) and any(m.kind == "channel" for m in self.rwkv_mixes):
            return "rwkv"
        return None

    def linear_at(self, node: ir.Node) -> Linear | None:
        return next((lin for lin in self.linears if lin.node is node), None)

    def summary(self) -> dict:
        out = {"linears": len(self.linears), "norms": len(self.norms),
               "norm_forms": sorted({f"{n.kind}:{n.form}" for n in self.norms}),
               "attentions": len(self.attentions), "mlps": sorted({m.kind for m in self.mlps}),
               "embeddings": len(self.embeddings), **({"moe": f"{len(self.moes)} x {len(self.moes[0].experts)} experts"
                                                      f" top-{self.moes[0].top_k}"} if self.moes else {}), "lm_head": self.lm_head.name if self.lm_head else None,
               **({"mamba_mixers": len(self.mamba_mixers)} if self.mamba_mixers else {}),
               **({"rwkv_mixes": sorted(m.kind for m in self.rwkv_mixes)} if self.rwkv_mixes else {})}
        if self.attentions:
            a = self.attentions[0]
            out.update(heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim, rope=a.rope)
        if self.stream is not None:
            out.update(stream_width=self.stream.width, pre_norm=self.stream.pre_norm,
                       residual_adds=len(self.stream.adds), stream_rotatable=self.stream.rotatable)
        return out


def analyse(model: ir.Model) -> Structure:
    """Everything the recognisers find in `model` (read-only)."""
    s = Structure()
    graph = model.graph
    s.linears = find_linears(graph)
    s.norms = find_norms(model, s.rejected)
    s.attentions = find_attentions(model, s.linears, s.norms, s.rejected)
    s.mlps = find_mlps(model, s.linears, s.rejected)
    s.moes = find_moes(s.linears, s.mlps, s.rejected)
    s.mamba_mixers = find_mamba_mixers(s.linears, s.rejected)
    s.rwkv_mixes = find_rwkv_mixes(s.linears, s.rejected)
    s.embeddings = find_embeddings(graph)
    s.stream = find_residual_stream(graph, s.linears, s.norms, s.embeddings, s.moes)
    if s.stream is not None:
        s.lm_head = s.stream.lm_head
    return s


def is_transformer(model: ir.Model) -> bool:
    """True when the graph has attention (Softmax between two activation MatMuls, fed by projections)
    and at least one norm. Cheap: no pattern search beyond what those two need."""
    if not any(n.op_type == "Softmax" for n in model.graph):
        return False
    if not find_softmaxes(model):
        return False
    return bool(find_norms(model))
