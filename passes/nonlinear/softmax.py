"""The Softmax sites the softmax replacements (qans, integer_ops) rewrite, and the exact softmax
they measure their error against."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.analysis.structure import find_softmaxes


def softmax_nodes(model: ir.Model, attention_only: bool, exclude) -> list[ir.Node]:
    """FLOAT Softmax nodes of the main graph (those onnxq.analysis places in attention only, when asked),
    minus those named in `exclude`."""
    if attention_only:
        candidates = find_softmaxes(model)
    else:
        candidates = [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
    return [n for n in candidates if n.name not in exclude and n.inputs[0].dtype == ir.DataType.FLOAT]


def exact_softmax(rows: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    e = np.exp(rows - rows.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
