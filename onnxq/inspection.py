"""`onnxq inspect`: what is in a model, how much of it is quantized, what ran, and what stayed float.

Coverage counts the compute ops (everything but Q/DQ, constants and shape bookkeeping) whose float
inputs all arrive through DequantizeLinear, by count and by FLOPs; FLOPs come from inferred shapes
(symbolic dimensions such as batch or sequence length are counted as 1).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.checks import infer_shapes
from onnxq.graph import WEIGHTED_OPS, const_array, opset_version
from onnxq.pipeline import read_record
from onnxq.qdq import FLOAT_REASON_KEY, QUANTIZED_KEY
from onnxq.qdq_rules import NON_NUMERIC

_BOOKKEEPING = set(NON_NUMERIC) | {"QuantizeLinear", "DequantizeLinear", "Constant", "Identity"}
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass
class Inspection:
    opset: int
    op_counts: dict[str, int]
    quantized_op_counts: dict[str, int]
    qdq: dict[str, int]
    coverage_by_count: float
    coverage_by_flops: float
    total_gflops: float
    passes: list[dict[str, Any]]
    float_reasons: dict[str, list[str]] = field(default_factory=dict)  # reason -> node names
    metadata: dict[str, str] = field(default_factory=dict)


def is_quantized(node: ir.Node) -> bool:
    """True when every float data input (weights included) arrives through a DequantizeLinear."""
    weighted = node.op_type in WEIGHTED_OPS
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.dtype in _FLOAT]
    if not data:
        return False
    for index, v in data:
        producer = v.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            continue
        if const_array(v) is not None and not (weighted and index < 2):
            continue  # biases and scalar arguments are not quantized data
        return False
    return True


def node_flops(node: ir.Node) -> float:
    """Multiply-accumulates ×2 for weighted layers, one per output element otherwise."""
    out = node.outputs[0] if node.outputs else None
    out_elems = _elements(out.shape) if out is not None else 0
    if node.op_type in ("Conv", "ConvTranspose") and node.inputs[1] is not None and node.inputs[1].shape is not None:
        w = [d if isinstance(d, int) else 1 for d in node.inputs[1].shape]
        per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else w[0] * int(np.prod(w[2:])) // max(w[1], 1)
        return 2.0 * out_elems * per_output
    if node.op_type in ("MatMul", "Gemm") and node.inputs[0] is not None and node.inputs[0].shape is not None:
        k = node.inputs[0].shape[-1]
        if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
            k = node.inputs[0].shape[0]
        return 2.0 * out_elems * (k if isinstance(k, int) else 1)
    return float(out_elems)


def _elements(shape) -> int:
    if shape is None:
        return 1
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape])) if len(shape) else 1


def inspect_model(model: ir.Model) -> Inspection:
    infer_shapes(model)
    counts, quantized, qdq = Counter(), Counter(), Counter()
    total_flops = quant_flops = 0.0
    reasons: dict[str, list[str]] = defaultdict(list)
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            key = node.op_type + (" (weight)" if const_array(node.inputs[0]) is not None else "")
            qdq[key] += 1
            continue
        counts[node.op_type] += 1
        if node.op_type in _BOOKKEEPING:
            continue
        flops = node_flops(node)
        total_flops += flops
        if is_quantized(node):
            quantized[node.op_type] += 1
            quant_flops += flops
        reason = node.metadata_props.get(FLOAT_REASON_KEY)
        if reason:
            reasons[f"{node.op_type}: {reason}"].append(node.name)
        note = node.metadata_props.get(QUANTIZED_KEY, "")
        for part in note.split("; "):
            if " kept float: " in part:
                reasons[f"{node.op_type} input {part}"].append(node.name)
    compute = sum(c for op, c in counts.items() if op not in _BOOKKEEPING)

    return Inspection(
        opset=opset_version(model), op_counts=dict(counts), quantized_op_counts=dict(quantized), qdq=dict(qdq),
        coverage_by_count=sum(quantized.values()) / compute if compute else 0.0,
        coverage_by_flops=quant_flops / total_flops if total_flops else 0.0,
        total_gflops=total_flops / 1e9, passes=read_record(model), float_reasons=dict(reasons),
        metadata={k: v for k, v in model.metadata_props.items() if not k.startswith("onnxq.pass")},
    )
