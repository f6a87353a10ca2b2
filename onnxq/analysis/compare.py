"""`onnxq compare`: how far a quantized model is from its FP32 original, output by output and layer by layer.

Both models run on the same data in ONNX Runtime, batch by batch, and only running sums are kept:
- per output: mean cosine similarity per sample, SQNR = 10·log10(Σ ref² / Σ (q − ref)²) in dB, max
  absolute error, and top-1 agreement along the last axis for classifier-like outputs;
- per layer: SQNR of every intermediate float tensor the two graphs share by name (quantization
  keeps the original tensor names), worst first, to show which layer hurts most.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from onnxq.errors import OnnxqError
from onnxq.ir.checks import infer_shapes
from onnxq.progress import progress
from onnxq.runtime.session import exposing, session
from onnxq.stats.calib_data import load_calibration, model_inputs

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


@dataclass
class Agreement:
    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


class _Accumulator:
    def __init__(self):
        self.signal = self.noise = 0.0
        self.cos_sum = 0.0
        self.samples = 0
        self.max_err = 0.0
        self.top1_hits = self.top1_total = 0

    def update(self, ref: np.ndarray, out: np.ndarray, *, detailed: bool) -> None:
        ref64, diff = ref.astype(np.float64), out.astype(np.float64) - ref.astype(np.float64)
        self.signal += float(np.sum(ref64 ** 2))
        self.noise += float(np.sum(diff ** 2))
        if not detailed:
            return
        self.max_err = max(self.max_err, float(np.abs(diff).max(initial=0.0)))
        a = ref64.reshape(len(ref64), -1) if ref64.ndim > 1 else ref64.reshape(1, -1)
        b = a + diff.reshape(a.shape)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cos_sum += float(np.sum(np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0)))
        self.samples += len(a)
        if ref.ndim in (2, 3) and ref.shape[-1] > 1:  # class scores, or per-token logits
            self.top1_hits += int(np.sum(ref.argmax(-1) == out.argmax(-1)))
            self.top1_total += int(np.prod(ref.shape[:-1]))

    @property
    def sqnr_db(self) -> float:
        """inf when the outputs agree exactly, -inf when there is no signal or infinite noise, nan when a
        model produced NaN."""
        if self.noise == 0:
            return math.inf
        ratio = self.signal / self.noise  # float division: inf / inf is nan, x / inf is 0
        if math.isnan(ratio):
            return math.nan
        return 10 * math.log10(ratio) if 0 < ratio < math.inf else (-math.inf if ratio <= 0 else math.inf)


def compare_models(reference: ir.Model, quantized: ir.Model, data: Any, *, layers: bool = True,
                   max_samples: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Agreement of `quantized` with `reference` on `data`: {"outputs": [...], "layers": [...]}."""
    infer_shapes(reference)
    infer_shapes(quantized)
    _check_same_inputs(reference, quantized)
    batches = load_calibration(data, reference, limit=max_samples)
    out_names = [v.name for v in reference.graph.outputs]
    missing = [n for n in out_names if n not in {v.name for v in quantized.graph.outputs}]
    if missing:
        raise OnnxqError(f"the quantized model lacks output(s) {missing} of the reference model")
    layer_names = _shared_layers(reference, quantized) if layers else []
    names = out_names + [n for n in layer_names if n not in out_names]
    ref_sess, q_sess = session(exposing(reference, names)), session(exposing(quantized, names))
    acc = {n: _Accumulator() for n in names}
    for feed in progress(batches, desc="comparing", total=len(batches), unit="batch", disable=not show_progress):
        ref_values = run_on_data(ref_sess, names, feed, "the reference model")
        q_values = run_on_data(q_sess, names, feed, "the quantized model")
        for name, r, q in zip(names, ref_values, q_values):
            if np.issubdtype(r.dtype, np.floating):
                acc[name].update(r, q, detailed=name in out_names)
    outputs = [Agreement(n, acc[n].cos_sum / max(acc[n].samples, 1), acc[n].sqnr_db, acc[n].max_err,
                         acc[n].top1_hits / acc[n].top1_total if acc[n].top1_total else None) for n in out_names]
    layer_rows = sorted(({"tensor": n, "sqnr_db": acc[n].sqnr_db} for n in layer_names if acc[n].signal > 0),
                        key=lambda row: row["sqnr_db"])
    return {"samples": batches.num_samples, "outputs": [asdict(o) for o in outputs], "layers": layer_rows}


def run_on_data(sess, names: list[str], feed: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """`sess.run`, with ONNX Runtime's complaint about the data (an index out of range, a shape the
    graph cannot take) turned into a one-line OnnxqError naming `what` failed."""
    try:
        return sess.run(names, feed)
    except (ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException) as exc:
        raise OnnxqError(f"ONNX Runtime cannot run {what} on this data: {_first_line(exc)}") from None


def _check_same_inputs(reference: ir.Model, quantized: ir.Model) -> None:
    """Both models must take the same feeds: same input names, element types and fixed dimensions."""
    ref = {s.name: s for s in model_inputs(reference)}
    quant = {s.name: s for s in model_inputs(quantized)}
    if set(ref) != set(quant):
        raise OnnxqError(f"the models take different inputs: reference {sorted(ref)}, quantized {sorted(quant)}")
    for name, r in ref.items():
        q = quant[name]
        clash = len(r.dims) != len(q.dims) or any(a is not None and b is not None and a != b
                                                  for a, b in zip(r.dims, q.dims))
        if r.dtype != q.dtype or (r.dims and q.dims and clash):
            raise OnnxqError(f"input '{name}' differs between the models: reference {r.describe()}, "
                             f"quantized {q.describe()}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _shared_layers(reference: ir.Model, quantized: ir.Model) -> list[str]:
    """Float tensors computed by nodes in both graphs under the same name, in reference order."""
    in_quantized = {v.name for node in quantized.graph for v in node.outputs}
    names = []
    for node in reference.graph:
        if node.op_type in ("Constant", "Shape"):
            continue
        for v in node.outputs:
            if v.name in in_quantized and v.dtype in _FLOAT:
                names.append(v.name)
    return names
