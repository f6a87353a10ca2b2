"""`onnxq compare`: how far a quantized model is from its FP32 original, output by output and layer by layer.

Both models run on the same data in ONNX Runtime, batch by batch, and only running sums are kept, so
the results do not depend on the batch size:
- per float output: mean cosine similarity per sample, SQNR = 10·log10(Σ ref² / Σ (q − ref)²) in dB
  and max absolute error; top-1 agreement along the last axis when the output is a class
  distribution (`class_distribution` says when);
- per integer or bool output (class ids, token ids, masks): how many elements differ, since a
  cosine or SQNR of integers says nothing;
- per layer: SQNR of every intermediate float tensor the two graphs share by name (quantization
  keeps the original tensor names), worst first, to show which layer hurts most.
Positions where the padding-mask input is 0 are left out of every number, as quantize leaves them
out of calibration (onnxq.stats.calib_data): tensors whose first two axes are (batch, sequence).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from onnxq.errors import OnnxqError
from onnxq.ir.checks import infer_shapes
from onnxq.ir.graph import attr, is_const, opset_version
from onnxq.progress import progress
from onnxq.runtime.session import exposing, session
from onnxq.stats.calib_data import float_input_types, load_calibration, model_inputs, with_float_types

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
_LINEAR_HEADS = ("Gemm", "MatMul")
logger = logging.getLogger("onnxq")


@dataclass
class Agreement:
    name: str
    kind: str  # "float" or "integer" (integer and bool outputs)
    cosine: float | None  # float outputs only
    sqnr_db: float | None
    max_abs_error: float | None
    top1_agreement: float | None  # class distributions only
    classes: str  # whether the output is a class distribution, and why
    elements: int  # elements compared (padded positions left out)
    differing: int | None  # integer outputs: elements that differ

    @property
    def verdict(self) -> str:
        """Integer outputs in words: "identical" or "N of M elements differ"."""
        if self.differing is None:
            return ""
        return "identical" if self.differing == 0 else f"{self.differing} of {self.elements} elements differ"


def class_distribution(model: ir.Model, value: ir.Value) -> str | None:
    """Why `value` (a graph output of `model`) is a class distribution, or None when it is not.

    The rule: a float tensor whose last axis holds the classes (checked ≥ 2 on the data) and that
    (a) comes from a Softmax/LogSoftmax over the last axis, or is read by an ArgMax/TopK over the
    last axis, at any rank; or (b) has rank 2, [batch, classes], and comes from a linear classifier
    head (Gemm, MatMul, or a bias Add after a MatMul). Anything else, such as an embedding from a
    pooling or normalisation, or [batch, seq, hidden] states, is not one."""
    if value.dtype not in _FLOAT or value.shape is None or len(value.shape) < 1:
        return None
    rank, producer = len(value.shape), value.producer()
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax") \
            and _last_axis(attr(producer, "axis", -1 if opset_version(model) >= 13 else 1), rank):
        return f"{producer.op_type} over the last axis"
    for reader in value.consumers():
        default = 0 if reader.op_type == "ArgMax" else -1
        if reader.op_type in ("ArgMax", "TopK") and _last_axis(attr(reader, "axis", default), rank):
            return f"read by {reader.op_type} over the last axis"
    if rank == 2 and producer is not None and _is_linear_head(producer):
        return f"[batch, classes] logits of a {producer.op_type} head"
    return None


def _last_axis(axis: int, rank: int) -> bool:
    return axis in (-1, rank - 1)


def _is_linear_head(node: ir.Node) -> bool:
    if node.op_type in _LINEAR_HEADS:
        return True
    if node.op_type != "Add" or len(node.inputs) != 2:
        return False
    sources = [v.producer() for v in node.inputs if v is not None]
    return any(p is not None and p.op_type == "MatMul" for p in sources) \
        and any(v is not None and is_const(v) for v in node.inputs)


def _keep(mask: np.ndarray | None, x: np.ndarray) -> np.ndarray | None:
    """The padding mask broadcast over `x` when x's first two axes are (batch, sequence), else None."""
    if mask is None or x.ndim < 2 or x.shape[:2] != mask.shape:
        return None
    return np.broadcast_to(mask.astype(bool).reshape(mask.shape + (1,) * (x.ndim - 2)), x.shape)


class _Accumulator:
    def __init__(self, classes: bool = False):
        self.classes = classes
        self.signal = self.noise = 0.0
        self.cos_sum = 0.0
        self.samples = 0
        self.max_err = 0.0
        self.top1_hits = self.top1_total = 0
        self.elements = 0
        self.differing = 0
        self.integer = False

    def update(self, ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None, *, detailed: bool) -> None:
        keep = _keep(mask, ref)
        if not np.issubdtype(ref.dtype, np.floating):
            self.integer = True
            differ = ref != out
            self.differing += int(np.sum(differ & keep if keep is not None else differ))
            self.elements += int(keep.sum()) if keep is not None else ref.size
            return
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf (a -inf mask in both) is NaN: reported as such
            self._update_float(ref, out, ref64, out64, keep, detailed)

    def _update_float(self, ref, out, ref64, out64, keep, detailed: bool) -> None:
        if keep is not None:  # padded positions count as exact agreement: zero in both
            ref64, out64 = np.where(keep, ref64, 0.0), np.where(keep, out64, 0.0)
        diff = out64 - ref64
        self.signal += float(np.sum(ref64 ** 2))
        self.noise += float(np.sum(diff ** 2))
        self.elements += int(keep.sum()) if keep is not None else ref.size
        if not detailed:
            return
        self.max_err = max(self.max_err, float(np.abs(diff).max(initial=0.0)))
        a = ref64.reshape(len(ref64), -1) if ref64.ndim > 1 else ref64.reshape(1, -1)
        b = a + diff.reshape(a.shape)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # overflow: NaN, reported as not finite
        self.cos_sum += float(np.sum(np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0)))
        self.samples += len(a)
        if self.classes and ref.shape[-1] >= 2:
            hits = ref.argmax(-1) == out.argmax(-1)
            positions = keep[..., 0] if keep is not None and ref.ndim >= 3 else np.ones(hits.shape, bool)
            self.top1_hits += int(np.sum(hits & positions))
            self.top1_total += int(positions.sum())

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

    def agreement(self, name: str, classes: str | None) -> Agreement:
        if self.integer:
            return Agreement(name, "integer", None, None, None, None, "integer output", self.elements,
                             self.differing)
        top1 = self.top1_hits / self.top1_total if self.top1_total else None
        return Agreement(name, "float", self.cos_sum / max(self.samples, 1), self.sqnr_db, self.max_err, top1,
                         classes or "not a class distribution", self.elements, None)


def compare_models(reference: ir.Model, quantized: ir.Model, data: Any, *, layers: bool = True,
                   max_samples: int | None = None, batch_size: int = 1, padding_mask: str | None = "auto",
                   show_progress: bool = True, layer_details: bool = False) -> dict[str, Any]:
    """Agreement of `quantized` with `reference` on `data`: {"samples", "padding_mask", "outputs": [...],
    "layers": [...]}; with `layer_details` each layer row also has its mean cosine and max |error|. `batch_size` samples run at once (models with a dynamic batch); `padding_mask`
    names the input whose zeros mark padded positions ("auto": an integer/bool input named
    attention_mask; None: every position counts), as in onnxq.quantize."""
    infer_shapes(reference)
    infer_shapes(quantized)
    _check_same_inputs(reference, quantized)
    batches = load_calibration(data, reference, batch_size=batch_size, limit=max_samples, padding_mask=padding_mask)
    if batches.left_out:  # whole batches only, as in calibration: say what a remainder costs
        logger.warning(batches.left_out_message("compare"))
    out_names = [v.name for v in reference.graph.outputs]
    missing = [n for n in out_names if n not in {v.name for v in quantized.graph.outputs}]
    if missing:
        raise OnnxqError(f"the quantized model lacks output(s) {missing} of the reference model")
    classes = {v.name: class_distribution(reference, v) for v in reference.graph.outputs}
    for name, why in classes.items():
        logger.debug(f"compare: output '{name}': {why or 'not a class distribution (no top-1 agreement)'}")
    layer_names = _shared_layers(reference, quantized) if layers else []
    names = out_names + [n for n in layer_names if n not in out_names]
    ref_sess, q_sess = session(exposing(reference, names)), session(exposing(quantized, names))
    acc = {n: _Accumulator(classes=classes.get(n) is not None) for n in names}
    q_types = float_input_types(quantized)  # an FP16 quantized model reads the samples in FP16
    for feed in progress(batches, desc="comparing", total=len(batches), unit="batch", disable=not show_progress):
        ref_values = run_on_data(ref_sess, names, feed, "the reference model")
        q_values = run_on_data(q_sess, names, with_float_types(feed, q_types), "the quantized model")
        mask = feed.get(batches.padding_mask) if batches.padding_mask else None
        for name, r, q in zip(names, ref_values, q_values):
            if r.shape != q.shape:
                raise OnnxqError(f"tensor '{name}' has shape {list(r.shape)} in the reference model but "
                                 f"{list(q.shape)} in the quantized model")
            if name in out_names or np.issubdtype(r.dtype, np.floating):
                acc[name].update(r, q, mask, detailed=layer_details or name in out_names)
    outputs = [acc[n].agreement(n, classes[n]) for n in out_names]
    # worst first; identical tensors (inf) last, and NaN (a non-finite reference, e.g. a -inf mask) after them
    layer_rows = sorted(({"tensor": n, "sqnr_db": acc[n].sqnr_db,
                          **({"cosine": acc[n].cos_sum / max(acc[n].samples, 1), "max_abs_error": acc[n].max_err}
                             if layer_details else {})} for n in layer_names if acc[n].signal > 0),
                        key=lambda row: (math.isnan(row["sqnr_db"]), row["sqnr_db"]))
    return {"samples": batches.num_samples, "padding_mask": batches.padding_mask,
            "outputs": [{**asdict(o), "verdict": o.verdict} for o in outputs], "layers": layer_rows}


def run_on_data(sess, names: list[str], feed: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """`sess.run`, with ONNX Runtime's complaint about the data (an index out of range, a shape the
    graph cannot take) turned into a one-line OnnxqError naming `what` failed."""
    try:
        return sess.run(names, feed)
    except (ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException) as exc:
        raise OnnxqError(f"ONNX Runtime cannot run {what} on this data: {_first_line(exc)}") from None


def _check_same_inputs(reference: ir.Model, quantized: ir.Model) -> None:
    """Both models must take the same feeds: same input names, element types (or two float types: an
    FP16 quantized model of an FP32 one) and fixed dimensions."""
    ref = {s.name: s for s in model_inputs(reference)}
    quant = {s.name: s for s in model_inputs(quantized)}
    if set(ref) != set(quant):
        raise OnnxqError(f"the models take different inputs: reference {sorted(ref)}, quantized {sorted(quant)}")
    for name, r in ref.items():
        q = quant[name]
        clash = len(r.dims) != len(q.dims) or any(a is not None and b is not None and a != b
                                                  for a, b in zip(r.dims, q.dims))
        both_float = np.issubdtype(r.dtype, np.floating) and np.issubdtype(q.dtype, np.floating)
        if (r.dtype != q.dtype and not both_float) or (r.dims and q.dims and clash):
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
