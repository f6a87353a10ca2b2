"""split_range: x·Y = clip(x, −t, t)·Y + (x − clip(x, −t, t))·Y, each part its own quantized MatMul.

Kind: exact (in float the two parts sum to x, and matrix products distribute over the sum).
Per-channel smoothing cannot help a tensor whose values are heavy-tailed *within* channels or
tokens: SwiGLU down-projection inputs (rare large products, the massive first-token activations)
and attention probabilities (one attention-sink column near 1, everything else ≪ 1/127). A
per-tensor INT8 scale set by the rare large values rounds the bulk to a few levels. Split at the
threshold t (a percentile of |x| on calibration data), the inlier part gets a scale t/127 and
the outlier part, zero except at the rare large values, a scale set by those; zero stays exactly
zero under symmetric quantization, so the outlier part adds error only where it is non-zero.
Cost: a second MatMul sharing the same other input (the weight, or V), a Clip, a Sub and an Add.

Multi-level (`down_ratio` r > 1, down projections): thresholds t, t·r, t·r², … below the calibrated
max; part k = the slice of x between consecutive thresholds (chained Clip/Sub), each its own MatMul
and scale. SmolLM2's down inputs span 4 decades (massive activations up to ~3000, bulk < 1): one
split leaves values of 2-30 on a step of max/127 ≈ 20; with r = 8 every value sits on a step ≤ 1/16
of its level. `outlier_margin` m: the top part's calibrated range is widened m-fold (node metadata
`onnxq.range_margin`, read by `quantize`) because a few calibration windows see few of its values
and evaluation text exceeds them; the part is zero almost everywhere, so its coarser step is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.ir.graph import Namer, add_initializer, const_array, take_over_output
from onnxq.metadata import RANGE_MARGIN_KEY
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize
from onnxq.stats.samples import channel_max_and_rows


@dataclass(frozen=True)
class SplitRange(GraphPass):
    """Split each targeted MatMul's heavy-tailed input at a calibrated threshold (module docstring)."""

    name: ClassVar[str] = "split_range"
    kind: ClassVar[Kind] = Kind.EXACT

    sites: list[Literal["down", "probs"]] = option(["down", "probs"])
    # threshold t = this percentile of |x|; a list: the one whose simulated INT8 split has the least
    # output error on the sampled rows (x·W for down projections, x itself for probabilities)
    down_percentile: float | list[float] = option([99.0, 99.5, 99.9, 99.97], low=50.0, high=100.0)
    probs_percentile: float | list[float] = option([99.0, 99.9], low=50.0, high=100.0)
    sample_rows: int = option(256, low=1)
    seed: int = 0
    down_ratio: float = option(0.0, low=0.0)  # > 1: further split down inputs at t·r^k below their max (multi-level)
    outlier_margin: float = option(1.0, low=1.0)  # widen the top (outlier) part's calibrated range this many times

    def __post_init__(self):
        if 0.0 < self.down_ratio <= 1.0:
            raise ValueError(f"down_ratio {self.down_ratio} would not split further: 0 (off) or above 1")

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        s = st.analyse(model)
        graph, namer = model.graph, Namer(model.graph)
        targets: list[tuple[str, ir.Node, float]] = []
        if "down" in self.sites:
            targets += [("down", m.down.node, self.down_percentile) for m in s.mlps]
        if "probs" in self.sites:
            targets += [("probs", a.pv, self.probs_percentile) for a in s.attentions]
        if not targets:
            return {"split": 0}
        names = sorted({node.inputs[0].name for _, node, _ in targets})
        stats = channel_max_and_rows(model, names, ctx.require_calibration(self.name), self.sample_rows, self.seed,
                        show_progress=ctx.show_progress)
        done = 0
        for kind, node, pct in targets:
            x = node.inputs[0]
            amax = float(stats.amax[x.name].max())
            t = best_threshold(stats.rows(x.name), amax, const_array(node.inputs[1]),
                               pct if isinstance(pct, list) else [pct])
            if t is None:
                continue
            thresholds = [t]
            while kind == "down" and self.down_ratio > 1 and thresholds[-1] * self.down_ratio < amax:
                thresholds.append(thresholds[-1] * self.down_ratio)
            split_input(graph, namer, node, thresholds, self.outlier_margin if kind == "down" else 1.0)
            done += 1
        graph.sort()
        return {"split": done, "of": len(targets)}


def best_threshold(rows: np.ndarray, amax: float, weight: np.ndarray | None, percentiles: list[float]) -> float | None:
    """The candidate t with the least error of the split, both parts per-tensor INT8: measured on the
    product rows·W when the other operand is a constant W, on the rows themselves otherwise."""
    magnitude = np.abs(rows)
    best, best_err = None, np.inf
    reference = rows @ weight if weight is not None else rows
    for pct in percentiles:
        t = float(np.percentile(magnitude, pct))
        if not 0 < t < amax:
            continue
        inliers = np.clip(rows, -t, t)
        approx = _int8(inliers, t) + _int8(rows - inliers, amax - t)
        err = float(np.sum(((approx @ weight if weight is not None else approx) - reference) ** 2))
        if err < best_err:
            best, best_err = t, err
    return best


def _int8(x: np.ndarray, amax: float) -> np.ndarray:
    scale = max(amax, 1e-12) / 127
    return np.clip(np.round(x / scale), -127, 127) * scale


def split_input(graph: ir.Graph, namer: Namer, node: ir.Node, thresholds: float | list[float],
                margin: float = 1.0) -> None:
    """Rewrite node = MatMul(x, y) as Σ_k MatMul(part_k, y) + MatMul(rest, y), where part_k is x's slice
    between thresholds k−1 and k (clip of what the earlier parts left) and rest what is beyond the last."""
    thresholds = [thresholds] if isinstance(thresholds, (int, float)) else list(thresholds)
    x, y, out = node.inputs[0], node.inputs[1], node.outputs[0]
    base = node.name or x.name
    rest, partial, prev, new = x, None, 0.0, []
    for k, t in enumerate(thresholds):
        tag = "" if k == 0 else str(k)
        width = t - prev
        prev = t
        lo = add_initializer(graph, namer, f"{base}_split{tag}_lo", np.array(-width, np.float32))
        hi = add_initializer(graph, namer, f"{base}_split{tag}_hi", np.array(width, np.float32))
        clip = ir.node("Clip", [rest, lo, hi], name=namer.fresh(f"{base}_split{tag}_Clip"))
        clip.outputs[0].name = namer.fresh(f"{x.name}_inliers{tag}")
        sub = ir.node("Sub", [rest, clip.outputs[0]], name=namer.fresh(f"{base}_split{tag}_Sub"))
        sub.outputs[0].name = namer.fresh(f"{x.name}_outliers{tag}")
        part = ir.node("MatMul", [clip.outputs[0], y], name=namer.fresh(f"{base}_inliers{tag}"))
        part.outputs[0].name = namer.fresh(f"{out.name}_inlier{tag}_part")
        for v in (clip.outputs[0], sub.outputs[0]):
            v.dtype, v.shape = x.dtype, x.shape
        part.outputs[0].dtype, part.outputs[0].shape = out.dtype, out.shape
        new += [clip, sub, part]
        if partial is None:
            partial = part.outputs[0]
        else:
            acc = ir.node("Add", [partial, part.outputs[0]], name=namer.fresh(f"{base}_split{tag}_Sum"))
            acc.outputs[0].dtype, acc.outputs[0].shape = out.dtype, out.shape
            new.append(acc)
            partial = acc.outputs[0]
        rest = sub.outputs[0]
    if margin != 1:
        rest.producer().metadata_props[RANGE_MARGIN_KEY] = f"{margin:g}"
    graph.insert_before(node, new)
    node.replace_input_with(0, rest)
    add = ir.node("Add", [partial, out], name=namer.fresh(f"{base}_split_Add"))
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(node, add)
    take_over_output(out, add.outputs[0], keep=add, rename=False)
    name = out.name  # the sum keeps the MatMul's name (and graph-output slot); the MatMul computes a part now
    out.name = namer.fresh(f"{name}_outlier_part")
    add.outputs[0].name = name
