"""allocate_bits: choose each linear layer's weight width under an average-bits budget (mixed precision).

Kind: exact. The pass only marks each MatMul/Gemm with the width its weight will get (MatMuls sharing one
weight share the width) (node metadata
`onnxq.weight_bits`); the quantize step after it stores that weight at that width, and the plan is kept in
the pass record; `onnxq inspect` shows the widths (from the node tags). The model's function is unchanged until quantize.

Methods (onnxq.quant.bit_allocation has the maths and the solver):
* `luq`: layers whose outputs have lower entropy on the calibration data get fewer bits;
* `sensitivity`: the model's output error with one layer at a time quantized at each width, measured;
* `uniform`: every layer at the budget (which must then be one of the widths).
Widths 2, 3, 4, 6, 8; the average is weighted by each layer's number of weights.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis.linears import find_linears
from onnxq.ir.graph import const_array
from onnxq.metadata import WEIGHT_BITS_KEY
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext, before_quantize
from onnxq.progress import progress
from onnxq.quant.bit_allocation import (
    WIDTHS,
    OutputEntropy,
    allocate,
    entropy_errors,
    measure_sensitivity,
    read_errors,
    weight_format,
    write_errors,
)
from onnxq.quant.qdq import quantize_weight, scale_per_element
from onnxq.stats.service import observe


@dataclass(frozen=True)
class AllocateBits(GraphPass):
    name: ClassVar[str] = "allocate_bits"
    kind: ClassVar[Kind] = Kind.EXACT

    budget: float = option(4.0, low=2.0, high=8.0)  # average weight bits over the linear layers
    method: Literal["luq", "sensitivity", "uniform"] = "luq"
    widths: list[int] = option(list(WIDTHS))
    batches: int = option(1, low=1)  # calibration batches the sensitivity trials run on
    # sensitivity: a JSON file of measured errors, read when it covers every layer and width, written otherwise
    # (one measurement serves several budgets)
    cache: str = ""

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)
        unknown = sorted(set(self.widths) - set(WIDTHS))
        if unknown or not self.widths:
            raise PassConditionError(f"allocate_bits: widths {self.widths}: choose from {list(WIDTHS)}")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        # one width per weight: the MatMuls split_range made from one layer share it
        readers: dict[str, list] = {}
        for lin in find_linears(model.graph):
            if lin.node.op_type in ("MatMul", "Gemm") and lin.weight.is_initializer():
                readers.setdefault(lin.weight.name, []).append(lin)
        if not readers:
            raise PassConditionError("allocate_bits: the model has no MatMul/Gemm with a constant weight")
        sizes = {name: int(const_array(lins[0].weight).size) for name, lins in readers.items()}
        if self.method == "uniform":
            if self.budget not in self.widths:
                raise PassConditionError(f"allocate_bits: uniform needs a budget among the widths {self.widths}")
            bits = dict.fromkeys(sizes, int(self.budget))
        else:
            errors = self._luq_errors(model, readers, ctx) if self.method == "luq" else \
                self._sensitivity_errors(model, readers, ctx)
            bits = allocate(sizes, errors, self.budget, self.widths).bits
        for name, lins in readers.items():
            for lin in lins:
                lin.node.metadata_props[WEIGHT_BITS_KEY] = str(bits[name])
        average = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
        counts = Counter(bits.values())
        ctx.log(f"allocate_bits ({self.method}): average {average:.2f} bits; "
                + ", ".join(f"{counts[b]} weights at {b}" for b in sorted(counts)))
        return {"method": self.method, "budget": self.budget, "average_bits": round(average, 3),
                "weights_per_width": {str(b): counts[b] for b in sorted(counts)}}

    def _luq_errors(self, model, readers, ctx) -> dict:
        observer = OutputEntropy(sorted({lin.output.name for lins in readers.values() for lin in lins}))
        observe(model, ctx.require_calibration(self.name), observer, desc="allocate_bits: output entropy",
                show_progress=ctx.show_progress)
        entropy = observer.entropies()
        return entropy_errors({name: float(np.mean([entropy[lin.output.name] for lin in lins]))
                               for name, lins in readers.items()}, self.widths)

    def _sensitivity_errors(self, model, readers, ctx) -> dict:
        feeds = [dict(feed) for _, feed in zip(range(self.batches), ctx.require_calibration(self.name))]
        key = _cache_key(model, readers, ctx.scheme, feeds)
        cached = read_errors(self.cache, key, list(readers), self.widths) if self.cache else None
        if cached is not None:
            ctx.log(f"allocate_bits: sensitivity read from {self.cache}")
            return cached
        errors = self._measure(model, readers, feeds, ctx)
        if self.cache:
            write_errors(self.cache, key, errors)
        return errors

    def _measure(self, model, readers, feeds, ctx) -> dict:
        scheme = ctx.scheme
        axes = {name: (0 if lins[0].transposed else 1) for name, lins in readers.items()}

        def quantized(name: str, w: np.ndarray, bits: int) -> np.ndarray:  # as the quantize step will store it
            block = scheme.block_size if bits <= 4 else 0  # wider grids go per channel there
            axis = axes[name] if scheme.per_channel or block else None
            q, scale = quantize_weight(w, axis, weight_format(bits), scheme.weight_calibrator, block)
            return (q.astype(np.float32) * scale_per_element(scale, w.shape, axis, block)).astype(np.float32)

        show = ctx.show_progress
        return measure_sensitivity(model, list(readers), quantized, feeds, self.widths,
                                   progress=lambda items, **kw: progress(items, disable=not show, **kw))


def _cache_key(model, readers, scheme, feeds) -> str:
    """What a stored sensitivity depends on: every weight and the trial batches (a checksum), the weight scheme."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    for name in readers:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(const_array(model.graph.initializers[name]), dtype=np.float32).tobytes())
    return f"{digest.hexdigest()[:16]}/{scheme.weights}/{scheme.block_size}/{scheme.weight_calibrator}"
