"""Quantization-space utilisation (QSUR): how much of a per-tensor quantization grid an activation fills.

A linear layer's input, seen as d-dimensional vectors x (one per token or pixel), fills an ellipsoid:
mean μ, covariance Σ = QΛQᵀ. A per-tensor symmetric grid is a cube centred on 0 whose half-side must
reach the furthest axis, max_j (|μ_j| + c·√Σ_jj). The ellipsoid's volume grows with Π √λ_i, the
cube's with its side to the d-th power, so their ratio (QSUR, as OSTQuant defines it) is tiny in high
dimension. We report its d-th root without the ball-to-cube constant,

    u = (Π_i √λ_i)^(1/d) / max_j (√Σ_jj + |μ_j| / c),     c = 3 (three standard deviations),

a number in (0, 1]: 1 when every direction has the same spread and the mean is 0, small when a few
channels (outliers) or a few directions set the grid while the rest use a sliver of it. An orthogonal
transform moves spread between axes (it can lower the largest or raise it) but keeps Π λ_i; scaling
changes both.
Diagnostic only: nothing in the quantizer reads it. In a quantized model the input is read where its
activation QuantizeLinear takes it, so a model before and after onnxq compares layer by layer (by node
name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.ir.linear import is_weight
from onnxq.runtime.session import exposing, session

SIGMAS = 3.0
MAX_ROWS = 8192  # vectors per tensor: enough for a stable covariance of a few thousand channels


def utilisation(x: np.ndarray) -> float:
    """u for samples `x` of shape (n, d), n vectors of d channels. Channels that never change are left
    out (they hold no spread to measure, only a mean); NaN when fewer than 2 vectors per remaining
    channel are given, where the covariance's small eigenvalues are noise."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("utilisation needs an (n, d) array")
    mean, sd = x.mean(axis=0), x.std(axis=0)
    live = sd > 0
    d = int(live.sum())
    if d == 0 or x.shape[0] < 2 * d:
        return float("nan")
    cov = np.atleast_2d(np.cov(x[:, live], rowvar=False))
    eig = np.maximum(np.linalg.eigvalsh(cov), 0.0)
    if eig.min() <= 0.0:  # a direction with no spread at all (channels that move together): nothing filled
        return 0.0
    geometric_sd = float(np.exp(0.5 * np.log(eig).mean()))
    half_side = float(np.max(np.sqrt(np.diag(cov)) + np.abs(mean[live]) / SIGMAS))
    return geometric_sd / half_side


def _before_qdq(value: ir.Value) -> ir.Value:
    """The tensor a QuantizeLinear → DequantizeLinear pair quantizes, or `value` itself."""
    dq = value.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = dq.inputs[0].producer()
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0]
    return value


def linear_inputs(model: ir.Model) -> dict[str, str]:
    """Node name → activation input of every MatMul/Gemm whose other operand is a weight, in graph order;
    in a quantized model the tensor its activation Q/DQ quantizes (what the grid must hold)."""
    found: dict[str, str] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2 and node.inputs[0] is not None \
                and is_weight(node.inputs[1]):
            found[node.name] = _before_qdq(node.inputs[0]).name
    return found


def model_utilisation(model: ir.Model, data: Iterable[Mapping[str, np.ndarray]],
                      layers: Mapping[str, str] | None = None) -> dict[str, float]:
    """u of every linear layer's activation input (node name → u) over the batches in `data`; layers that
    share an input are measured once. NaN where too few vectors were seen (see `utilisation`)."""
    layers = dict(layers if layers is not None else linear_inputs(model))
    names = list(dict.fromkeys(layers.values()))
    if not names:
        return {}
    sess = session(exposing(model, names))
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in data:
        for name, value in zip(names, sess.run(names, dict(feed))):
            have = sum(len(r) for r in rows[name])
            if have < MAX_ROWS:
                flat = np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1])
                rows[name].append(flat[:MAX_ROWS - have])
    per_tensor = {n: utilisation(np.concatenate(parts)) if parts else float("nan") for n, parts in rows.items()}
    return {node: per_tensor[tensor] for node, tensor in layers.items()}
