"""vq_weights: RWKVQuant's hybrid scalar/vector weight quantization for RWKV blocks.

Kind: approximate (weight quantization; the error is what the codebooks leave, measured by the
benchmark as perplexity). For every linear layer of the recognised RWKV time and channel mixing, the
coarse-to-fine proxy (onnxq.quant.vector_quant) scores how evenly the weight's values are spread; the
least uniform share `vector_share` of the layers (or those past explicit thresholds) are vector-quantized
and the rest are left to the quantize step's scalar grid. A vector-quantized weight W [in, out] becomes

    indices (uint8) → Cast(int32) → Gather(codebook int8 [K, dim]) → Reshape [in, out] → DequantizeLinear(scale)

in front of the MatMul: `dim` consecutive output channels of one input row share one index, the codebook
is fitted by k-means weighted by E[x_i²] (the diagonal of the layer's Hessian) and stored in 8 bits
with one scale; with `feedback` (GPTVQ) the indices are then chosen input row by input row, each row's
error pushed onto the rows after it through the inverse Hessian, as GPTQ does for scalar grids. The quantize step sees a dequantized weight and quantizes only the activation. With
`mixes`, the token-shift μ vectors (x·μ + x_prev·μ') get one-dimensional codebooks of `mix_entries`
values, weighted by E[x²] of the channel they multiply (RWKVQuant weights these codebooks by the
multiplied activation: its codebook optimisation for element-wise multiplication; the square matches
the squared error minimised). Codewords are rounded to `codeword_bits` integers with one scale per
codebook and every index is then re-chosen against the rounded codewords. Decay and bonus vectors stay float: they act through exponentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer, add_initializer, const_array
from onnxq.metadata import CODEBOOK_KEY
from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext, before_quantize
from onnxq.quant import vector_quant as vq
from onnxq.stats.observers import ChannelStatistics, SecondMoments
from onnxq.stats.service import observe


@dataclass(frozen=True)
class VectorQuantizeWeights(GraphPass):
    name: ClassVar[str] = "vq_weights"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    vector_share: float = 0.5  # share of the layers routed to VQ by the proxy (ignored with thresholds)
    coarse_threshold: float | None = None
    fine_threshold: float | None = None
    dim: int = 2
    entries: int = 256  # 2 weights per 8-bit index: 4 bits per weight
    codeword_bits: int = 8
    mixes: bool = True
    feedback: bool = False  # GPTVQ-style index choice under the layer Hessian (error pushed to later rows)
    mix_entries: int = 16
    iterations: int = 25
    seed: int = 0

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)
        if not 0 <= self.vector_share <= 1:
            raise PassConditionError(f"vq_weights: vector_share must lie in [0, 1], not {self.vector_share}")
        if (self.coarse_threshold is None) != (self.fine_threshold is None):
            raise PassConditionError("vq_weights: give both coarse_threshold and fine_threshold, or neither")
        for what, value, lo, hi in (("dim", self.dim, 1, 16), ("entries", self.entries, 2, vq.MAX_ENTRIES),
                                    ("mix_entries", self.mix_entries, 2, vq.MAX_ENTRIES), ("codeword_bits", self.codeword_bits, 2, 8)):
            if not lo <= value <= hi:
                raise PassConditionError(f"vq_weights: {what} must lie in [{lo}, {hi}], not {value}")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        mixes = st.analyse(model).rwkv_mixes
        linears = [lin for mix in mixes for lin in mix.linears if lin.node.op_type == "MatMul" and not lin.transposed]
        if not linears:
            ctx.log("vq_weights: no RWKV time or channel mixing recognised; nothing to do")
            return {"layers": 0}
        linears = list(dict.fromkeys(linears))
        # μ constants and the Muls reading them: an exporter may share one μ between mixes (identical values)
        readers_of: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        for mul, slot in dict.fromkeys(pair for m in mixes for mix in m.mixes for pair in mix.muls) if self.mixes else []:
            readers_of.setdefault(mul.inputs[slot], []).append((mul, slot))
        muls = [pair for pairs in readers_of.values() for pair in pairs]
        names = sorted({lin.input.name for lin in linears} | {mul.inputs[1 - slot].name for mul, slot in muls})
        stats = ChannelStatistics(names, axis=-1)
        hessians = SecondMoments(sorted({lin.input.name for lin in linears})) if self.feedback else None
        observe(model, ctx.require_calibration(self.name), stats, *([hessians] if hessians else []), desc="VQ statistics",
                show_progress=ctx.show_progress)
        graph, namer = model.graph, Namer(model.graph)
        scores = [vq.proxy(lin.weight_io()) for lin in linears]
        tau = ((self.coarse_threshold, self.fine_threshold) if self.coarse_threshold is not None
               else vq.thresholds_for_share(scores, self.vector_share))
        report, bits = {}, []
        for lin, score in zip(linears, scores):
            choice = score.choice(*tau)
            if choice == "vector" and lin.out_features % self.dim:
                choice = f"scalar ({lin.out_features} outputs are not a multiple of dim {self.dim})"
            report[lin.name] = {"coarse": round(score.coarse, 4), "fine": float(f"{score.fine:.4g}"), "choice": choice}
            if choice == "vector":
                w = lin.weight_io().astype(np.float32)
                h = vq.hessian_importance(stats.result[lin.input.name].mean_square, w.shape)
                book = vq.fit_codebook(w, dim=self.dim, entries=self.entries, importance=h,
                                       iterations=self.iterations, seed=self.seed)
                book = vq.with_quantized_codewords(book, self.codeword_bits, reassign=(w, h))
                if hessians is not None:  # GPTVQ: indices re-chosen row by row with the error pushed forward
                    book = vq.assign_with_feedback(w, book, hessians.result[lin.input.name])
                _replace_constant(graph, namer, [(lin.node, 1)], book, self.codeword_bits, f"{lin.name}_vq")
                bits.append((book.bits_per_weight(self.codeword_bits), w.size))
        for value, users in readers_of.items():
            mu = const_array(value).astype(np.float32)
            # E[x²] of the channels μ multiplies (summed over its readers): the squared error's weight
            h = sum(stats.result[mul.inputs[1 - slot].name].mean_square for mul, slot in users)
            book = vq.fit_codebook(mu.reshape(-1, 1), dim=1, entries=self.mix_entries,
                                   importance=vq.activation_importance(h, mu.shape).reshape(-1, 1),
                                   iterations=self.iterations, seed=self.seed)
            book = vq.with_quantized_codewords(book, self.codeword_bits, reassign=(mu.reshape(-1, 1), None))
            _replace_constant(graph, namer, users, book, self.codeword_bits, f"{users[0][0].name}_mu_vq", shape=mu.shape)
        graph.sort()
        ctx.log("vq_weights: " + ", ".join(f"{k} {v['choice']} (coarse {v['coarse']}, fine {v['fine']})"
                                           for k, v in report.items()))
        chosen = sum(v["choice"] == "vector" for v in report.values())
        return {"layers": len(linears), "vector": chosen, "scalar": len(linears) - chosen,
                "thresholds": [float(f"{t:.4g}") for t in tau],
                "vq_bits_per_weight": round(sum(b * n for b, n in bits) / sum(n for _, n in bits), 3) if bits else None,
                "mixes_vq": len(readers_of), "proxy": report}


def _replace_constant(graph: ir.Graph, namer: Namer, users: list[tuple[ir.Node, int]], book: vq.Codebook,
                      codeword_bits: int, base: str, shape: tuple[int, ...] | None = None) -> None:
    """Each (node, slot) in `users` reads DequantizeLinear(Reshape(Gather(int codebook, Cast(indices)))) instead
    of its constant: the codebook's weight."""
    node = users[0][0]
    codes, scale = vq.quantize_codewords(book, codeword_bits)
    target_shape = shape if shape is not None else book.shape
    inits = {
        "codebook": add_initializer(graph, namer, f"{base}_codebook", codes.astype(np.int8)),
        "indices": add_initializer(graph, namer, f"{base}_indices", book.indices),
        "shape": add_initializer(graph, namer, f"{base}_shape", np.array(target_shape, dtype=np.int64)),
        "scale": add_initializer(graph, namer, f"{base}_scale", np.array(scale, dtype=np.float32)),
    }
    cast = ir.node("Cast", [inits["indices"]], attributes={"to": ir.DataType.INT32}, name=namer.fresh(f"{base}_Cast"))
    gather = ir.node("Gather", [inits["codebook"], cast.outputs[0]], attributes={"axis": 0}, name=namer.fresh(f"{base}_Gather"))
    reshape = ir.node("Reshape", [gather.outputs[0], inits["shape"]], name=namer.fresh(f"{base}_Reshape"))
    dq = ir.node("DequantizeLinear", [reshape.outputs[0], inits["scale"]], name=namer.fresh(f"{base}_DequantizeLinear"))
    for n, dtype, out_shape in ((cast, ir.DataType.INT32, book.indices.shape), (gather, ir.DataType.INT8, (*book.indices.shape, book.dim)),
                                (reshape, ir.DataType.INT8, target_shape), (dq, ir.DataType.FLOAT, target_shape)):
        n.outputs[0].name = namer.fresh(f"{base}_{n.op_type.lower()}")
        n.outputs[0].dtype, n.outputs[0].shape = dtype, ir.Shape(out_shape)
        graph.insert_before(node, n)
    for n in (cast, gather, reshape, dq):  # one weight: inspect and has_qdq read them as such
        n.metadata_props[CODEBOOK_KEY] = f"{len(book.values)} x {book.dim} int{codeword_bits} codewords"
    for user, slot in users:
        user.replace_input_with(slot, dq.outputs[0])
