"""`onnxq report`: what a quantization did, gathered into one dictionary and written as one HTML page.

The report reads the quantized model's record (recipe, target, passes and their summaries, the
per-node float reasons and the nonlinear-replacement fidelity, `onnxq.metadata`), runs `compare` on
the data with per-layer cosine and SQNR, and makes one more pass of the data through the quantized
model for the activations each QuantizeLinear quantizes: observed range, a histogram, and the
per-channel max |x|. The clip of an activation is what its quantizer can represent:
[(qmin − zp)·s, (qmax − zp)·s]. Weights are read back from their DequantizeLinear (q − zp)·s, per
output channel. A channel is an outlier when its max |value| exceeds OUTLIER_FACTOR × the median of
its tensor's channels. Nothing is edited; the page itself is rendered by analysis.report_html.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq._version import __version__
from onnxq.analysis.compare import compare_models
from onnxq.analysis.inspection import inspect_model
from onnxq.ir.checks import infer_shapes
from onnxq.ir.graph import attr, const_array, is_const
from onnxq.ir.modelio import load_model
from onnxq.metadata import RECIPE_KEY, RECIPE_REASON_KEY, TARGET_KEY
from onnxq.quant.lint import lint
from onnxq.stats.calib_data import in_input_types, load_calibration
from onnxq.stats.observers import ChannelStatistics, Histograms, Range, Ranges
from onnxq.stats.service import StatisticsService

OUTLIER_FACTOR = 6.0      # a channel whose max |value| is this many times its tensor's median is an outlier
HISTOGRAM_BINS = 32       # per sign: 64 bins over ±HISTOGRAM_SPAN × the clip
HISTOGRAM_SPAN = 1.5      # the histogram shows this much beyond the clip; values further out land in the end bins
_LIMITS = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT4: (-8, 7),
           ir.DataType.UINT4: (0, 15), ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
           ir.DataType.FLOAT8E4M3FN: (-448, 448)}


def build_report(reference: Any, quantized: Any, data: Any, *, batch_size: int = 1, max_samples: int | None = None,
                 padding_mask: str | None = "auto", show_progress: bool = True,
                 paths: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able values. `reference` / `quantized`: paths, protos
    or onnx_ir models (not edited); `data`: as for compare. `paths` names the inputs for the page."""
    ref, quant = load_model(reference), load_model(quantized)
    if not isinstance(data, (str, os.PathLike, dict)):  # an iterable of feeds may be read only once: keep it
        data = load_calibration(data, ref, batch_size=batch_size, limit=max_samples, padding_mask=padding_mask)
    comparison = compare_models(ref, quant, data, layers=True, max_samples=max_samples, batch_size=batch_size,
                                padding_mask=padding_mask, show_progress=show_progress, layer_details=True)
    info = inspect_model(quant)
    props = quant.metadata_props
    target = props.get(TARGET_KEY) or "tensorrt"
    activations = _activations(quant, ref, data, batch_size, max_samples, padding_mask, show_progress)
    weights = _weights(quant)
    return {
        "version": __version__, "model_version": props.get("onnxq.version"),
        "recipe": props.get(RECIPE_KEY), "recipe_reason": props.get(RECIPE_REASON_KEY), "target": target,
        "paths": dict(paths or {}), "samples": comparison["samples"], "padding_mask": comparison["padding_mask"],
        "passes": info.passes, "outputs": comparison["outputs"], "layers": comparison["layers"],
        "coverage_by_count": info.coverage_by_count, "coverage_by_flops": info.coverage_by_flops,
        "activations": activations, "weights": weights,
        "outliers": _outliers(activations, "activation") + _outliers(weights, "weight"),
        "float_reasons": info.float_reasons,
        "lint": [{**vars(r), "status": r.status} for r in lint(quant, target)],
        "fidelity": info.fidelity, "nonlinear_ops": info.nonlinear_ops, "nonlinear_replaced": info.nonlinear_replaced,
        "outlier_factor": OUTLIER_FACTOR,
    }


def write_report(reference: Any, quantized: Any, data: Any, output: str | os.PathLike, **options) -> dict[str, Any]:
    """Build the report and write it as one self-contained HTML page to `output`; returns the report."""
    from onnxq.analysis.report_html import render
    from onnxq.ir.outputs import write_text

    paths = {"reference": _describe(reference), "quantized": _describe(quantized), "data": _describe(data)}
    report = build_report(reference, quantized, data, paths=paths, **options)
    write_text(output, render(report))
    return report


def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"(in memory: {type(source).__name__})"


def _quantizer_limits(node: ir.Node) -> tuple[int, int]:
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = node.outputs[0].dtype or (zp.dtype if zp is not None else None) or ir.DataType.UINT8
    return _LIMITS.get(dtype, (-128, 127))


def _activations(model: ir.Model, reference: ir.Model, data, batch_size, max_samples, padding_mask,
                 show_progress) -> list[dict]:
    """One row per activation tensor a QuantizeLinear reads: its clip, observed range, histogram and
    per-channel max |x| (channel axis 1 for rank 4, the last axis for rank 2 and 3)."""
    infer_shapes(model)
    rows: dict[str, dict] = {}
    for node in model.graph:
        if node.op_type != "QuantizeLinear" or is_const(node.inputs[0]):
            continue
        x = node.inputs[0]
        scale = const_array(node.inputs[1])
        zp_array = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if x.name in rows or scale is None:
            continue
        qmin, qmax = _quantizer_limits(node)
        s, zp = float(np.max(scale)), float(np.max(zp_array)) if zp_array is not None else 0.0
        rank = len(x.shape) if x.shape is not None else None
        rows[x.name] = {"tensor": x.name, "quantizer": node.name, "scale": s, "zero_point": zp, "qmin": qmin,
                        "qmax": qmax, "clip": [(qmin - zp) * s, (qmax - zp) * s], "rank": rank}
    if not rows:
        return []
    # checked against the reference, fed in the quantized model's own input types (FP16 with --high-precision)
    batches = load_calibration(data, reference, batch_size=batch_size, limit=max_samples, padding_mask=padding_mask)
    service = StatisticsService(model, in_input_types(batches, model), show_progress=show_progress)
    names = list(rows)
    ranges = service.register(Ranges(names))
    spans = {n: Range(-HISTOGRAM_SPAN * _amax(rows[n]["clip"]), HISTOGRAM_SPAN * _amax(rows[n]["clip"])) for n in names}
    histograms = service.register(Histograms(spans, bins=HISTOGRAM_BINS))
    by_channel = service.register(ChannelStatistics([n for n in names if rows[n]["rank"] == 4], axis=1,
                                                    mean_square=False))
    by_last = service.register(ChannelStatistics([n for n in names if rows[n]["rank"] in (2, 3)], axis=-1,
                                                 mean_square=False))
    service.run("report: activations")
    channels = {**by_channel.result, **by_last.result}
    for name, row in rows.items():
        r = ranges.result.get(name)
        row["observed"] = [r.lo, r.hi] if r is not None else None
        half_step = row["scale"] / 2  # values within half a step of the clip round onto its end code
        row["clipped"] = r is not None and (r.lo < row["clip"][0] - half_step or r.hi > row["clip"][1] + half_step)
        row["histogram"] = histograms.result[name].tolist() if name in histograms.result else []
        row["histogram_range"] = [spans[name].lo, spans[name].hi]
        row["channel_amax"] = channels[name].amax.tolist() if name in channels else []
    return list(rows.values())


def _amax(pair) -> float:
    return max(abs(pair[0]), abs(pair[1]))


def _output_axis(consumer: ir.Node | None, rank: int) -> int:
    """The output-channel axis of a weight read by `consumer`."""
    if consumer is None or rank < 2:
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if attr(consumer, "transB", 0) else 1
    if consumer.op_type in ("MatMul", "Gather"):
        return rank - 1
    return 0


def _weights(model: ir.Model) -> list[dict]:
    """One row per quantized weight: the dequantized (q − zp)·s range per output channel."""
    rows = []
    for node in model.graph:
        if node.op_type != "DequantizeLinear":
            continue
        q = const_array(node.inputs[0])
        scale = const_array(node.inputs[1])
        if q is None or scale is None or q.ndim == 0:
            continue
        zp = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        w = _dequantize(q, scale, zp, node)
        consumers = node.outputs[0].consumers()
        consumer = consumers[0] if consumers else None
        axis = _output_axis(consumer, w.ndim)
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        granularity = "per-tensor" if scale.size == 1 else ("blocked" if attr(node, "block_size", 0) else "per-channel")
        rows.append({"tensor": node.inputs[0].name, "layer": consumer.name if consumer is not None else "",
                     "op": consumer.op_type if consumer is not None else "", "shape": list(q.shape),
                     "granularity": granularity, "dtype": node.inputs[0].dtype.name if node.inputs[0].dtype else "",
                     "channel_min": flat.min(axis=1).tolist(), "channel_max": flat.max(axis=1).tolist(),
                     "channel_amax": np.abs(flat).max(axis=1).tolist()})
    return rows


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, node: ir.Node) -> np.ndarray:
    """(q − zp)·s with the scale broadcast per tensor, per axis or per block, as DequantizeLinear does."""
    x = q.astype(np.float64)
    if zp is not None and zp.size == 1:
        x = x - float(zp.ravel()[0])
    if scale.size == 1:
        return x * float(scale.ravel()[0])
    axis = attr(node, "axis", 1) % q.ndim
    block = attr(node, "block_size", 0)
    if block:  # scale has q's shape with axis divided into blocks
        s = np.repeat(scale.astype(np.float64), block, axis=axis)
        s = np.take(s, np.arange(q.shape[axis]), axis=axis)
        z = 0.0 if zp is None or zp.size == 1 else np.take(np.repeat(zp.astype(np.float64), block, axis=axis),
                                                           np.arange(q.shape[axis]), axis=axis)
        return (x - z) * s
    shape = [1] * q.ndim
    shape[axis] = -1
    z = 0.0 if zp is None or zp.size == 1 else zp.astype(np.float64).reshape(shape)
    return (x - z) * scale.astype(np.float64).reshape(shape)


def _outliers(rows: list[dict], kind: str) -> list[dict]:
    """Channels whose max |value| exceeds OUTLIER_FACTOR × the median over their tensor's channels."""
    found = []
    for row in rows:
        amax = np.asarray(row.get("channel_amax") or [], dtype=np.float64)
        if amax.size < 4:
            continue
        median = float(np.median(amax))
        if median <= 0:
            continue
        hits = np.nonzero(amax > OUTLIER_FACTOR * median)[0]
        if hits.size:
            ratios = amax[hits] / median
            order = np.argsort(-ratios)
            found.append({"kind": kind, "tensor": row["tensor"], "median": median, "channels": len(amax),
                          "outliers": [{"channel": int(hits[i]), "amax": float(amax[hits[i]]),
                                        "ratio": float(ratios[i])} for i in order]})
    return sorted(found, key=lambda f: -f["outliers"][0]["ratio"])
