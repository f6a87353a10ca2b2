"""`onnxq inspect`: what is in a model, how much of it is quantized, what ran, and what stayed float.

Coverage counts the compute ops (everything but Q/DQ, constants and shape bookkeeping) whose float
inputs all arrive through DequantizeLinear, by count and by FLOPs; FLOPs come from inferred shapes
(symbolic dimensions such as batch or sequence length, and the -1 some exporters write for them, are
counted as 1, so the count is never negative).

Nonlinear ops replaced by lookup tables or integer subgraphs (passes dulut, qans, integer_ops) are
counted as the one op they replace: the emitted nodes share a `onnxq.replacement` label, and the
group is quantized when its input is INT8 (or requantized to integers inside the group). Nonlinear
coverage is the share of the nonlinear and normalisation ops of the original graph (the NONLINEAR and
NORMALISATION categories of qdq_rules) that were replaced or whose inputs are quantized; `fidelity`
lists each replacement's measured error in INT8 output steps (model metadata `onnxq.fidelity`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.ir.checks import infer_shapes
from onnxq.ir.graph import WEIGHTED_OPS, is_const, opset_version
from onnxq.metadata import CODEBOOK_KEY, FIDELITY_KEY, FLOAT_REASON_KEY, QUANTIZED_KEY, REPLACEMENT_KEY, WEIGHT_BITS_KEY
from onnxq.pipeline import read_record
from onnxq.quant.qdq_rules import NON_NUMERIC, NONLINEAR, NORMALISATION

_BOOKKEEPING = set(NON_NUMERIC) | {"QuantizeLinear", "DequantizeLinear", "Constant", "Identity"}
_TABLE_READERS = ("Gather", "GatherElements", "GatherND")  # input 0 is data: a constant there is a table
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
    nonlinear_ops: int = 0            # nonlinear/normalisation ops of the original graph (replaced ones included)
    nonlinear_replaced: int = 0       # ... replaced by a lookup table or an integer subgraph
    nonlinear_quantized: int = 0      # ... still there, with quantized inputs
    nonlinear_coverage: float = 0.0   # (replaced + quantized) / nonlinear_ops; 1.0 when there are none
    replacements: int = 0             # replacement groups (each counted as one op in the coverage)
    fidelity: list[dict[str, Any]] = field(default_factory=list)
    # mixed precision (allocate_bits): width -> [weight tensors, their values] over the layers it tagged
    weight_widths: dict[int, list[int]] = field(default_factory=dict)


def is_quantized(node: ir.Node) -> bool:
    """True when every float data input (weights and embedding tables included) arrives through a
    DequantizeLinear."""
    weight_inputs = 2 if node.op_type in WEIGHTED_OPS else 1 if node.op_type in _TABLE_READERS else 0
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.dtype in _FLOAT]
    if not data:
        return False
    for index, v in data:
        producer = v.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            continue
        if is_const(v) and index >= weight_inputs:
            continue  # biases and scalar arguments are not quantized data
        return False
    return True


def node_flops(node: ir.Node) -> float:
    """Multiply-accumulates ×2 for weighted layers, one per output element otherwise."""
    out = node.outputs[0] if node.outputs else None
    out_elems = _elements(out.shape) if out is not None else 0
    if node.op_type in ("Conv", "ConvTranspose") and node.inputs[1] is not None and node.inputs[1].shape is not None:
        w = [_known(d) for d in node.inputs[1].shape]
        per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else w[0] * int(np.prod(w[2:])) // max(w[1], 1)
        return 2.0 * out_elems * per_output
    if node.op_type in ("MatMul", "Gemm") and node.inputs[0] is not None and node.inputs[0].shape is not None:
        k = node.inputs[0].shape[-1]
        if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
            k = node.inputs[0].shape[0]
        return 2.0 * out_elems * _known(k)
    return float(out_elems)


def _elements(shape) -> int:
    if shape is None:
        return 1
    return int(np.prod([_known(d) for d in shape])) if len(shape) else 1


def _known(dim) -> int:
    """A dimension's size, 1 where it is symbolic or negative (unknown)."""
    return dim if isinstance(dim, int) and dim >= 0 else 1


def inspect_model(model: ir.Model) -> Inspection:
    infer_shapes(model)
    counts, quantized, qdq = Counter(), Counter(), Counter()
    total_flops = quant_flops = 0.0
    reasons: dict[str, list[str]] = defaultdict(list)
    fidelity = json.loads(model.metadata_props.get(FIDELITY_KEY, "[]"))
    group_quantized = {e.get("replacement"): bool(e.get("input_quantized")) for e in fidelity}
    groups: dict[str, float] = defaultdict(float)  # replacement label -> FLOPs of its nodes
    group_ops: Counter = Counter()                  # ops that belong to replacements
    nonlinear = set(NONLINEAR) | set(NORMALISATION)
    nl_total = nl_quantized = 0
    widths: dict[int, list[int]] = {}
    seen_weights: set[str] = set()
    for node in model.graph:
        if CODEBOOK_KEY in node.metadata_props:  # vq_weights' Cast/Gather/Reshape/DequantizeLinear: one weight
            qdq["DequantizeLinear (codebook weight)"] += node.op_type == "DequantizeLinear"
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            key = node.op_type + (" (weight)" if is_const(node.inputs[0]) else "")
            qdq[key] += 1
            continue
        counts[node.op_type] += 1
        label = node.metadata_props.get(REPLACEMENT_KEY)
        if label:  # part of a replacement: counted once per group below
            groups[label] += node_flops(node) if node.op_type not in _BOOKKEEPING else 0.0
            group_ops[node.op_type] += 1
            continue
        if node.op_type in nonlinear:
            nl_total += 1
            nl_quantized += is_quantized(node)
        if node.op_type in _BOOKKEEPING:
            continue
        flops = node_flops(node)
        total_flops += flops
        if is_quantized(node):
            quantized[node.op_type] += 1
            quant_flops += flops
        if WEIGHT_BITS_KEY in node.metadata_props:
            _count_width(widths, node, seen_weights)
        reason = node.metadata_props.get(FLOAT_REASON_KEY)
        if reason:
            reasons[f"{node.op_type}: {reason}"].append(node.name)
        note = node.metadata_props.get(QUANTIZED_KEY, "")
        for part in note.split("; "):
            if " kept float: " in part:
                reasons[f"{node.op_type} input {part}"].append(node.name)
    for label, flops in groups.items():
        total_flops += flops
        if group_quantized.get(label, False):
            quantized["(replacement)"] += 1
            quant_flops += flops
    compute = sum(c - group_ops[op] for op, c in counts.items() if op not in _BOOKKEEPING) + len(groups)
    replaced = sum(1 for e in fidelity for op in e.get("replaced_ops", []) if op in nonlinear)
    nl_total += replaced

    return Inspection(
        opset=opset_version(model), op_counts=dict(counts), quantized_op_counts=dict(quantized), qdq=dict(qdq),
        coverage_by_count=sum(quantized.values()) / compute if compute else 0.0,
        coverage_by_flops=quant_flops / total_flops if total_flops else 0.0,
        total_gflops=total_flops / 1e9, passes=read_record(model), float_reasons=dict(reasons),
        metadata={k: v for k, v in model.metadata_props.items() if not k.startswith("onnxq.pass") and k != FIDELITY_KEY},
        nonlinear_ops=nl_total, nonlinear_replaced=replaced, nonlinear_quantized=nl_quantized, replacements=len(groups),
        nonlinear_coverage=(replaced + nl_quantized) / nl_total if nl_total else 1.0, fidelity=fidelity,
        weight_widths=dict(sorted(widths.items())),
    )


def _count_width(widths: dict[int, list[int]], node: ir.Node, seen: set[str]) -> None:
    """Add a tagged layer's weight (read through its DequantizeLinear) to its width's row, once per weight."""
    weight = node.inputs[1]
    producer = weight.producer() if weight is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        weight = producer.inputs[0]
    if weight is None or weight.name in seen:
        return
    seen.add(weight.name)
    size = int(np.prod(weight.shape.numpy())) if weight is not None and weight.shape is not None and \
        weight.shape.is_static() else 0
    row = widths.setdefault(int(node.metadata_props[WEIGHT_BITS_KEY]), [0, 0])
    row[0] += 1
    row[1] += size
