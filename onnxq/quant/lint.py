"""`onnxq lint`: the statically checkable rules a QDQ graph must meet for its deployment target
(docs/tensorrt-rules.md says what each TensorRT rule is and why; docs/ort-cpu.md the ort-cpu profile).

One table holds every rule, tagged with the targets whose profile it belongs to: `--target tensorrt`
(symmetric INT8, TensorRT's Q/DQ placement) and `--target ort-cpu` (what `quantize --target ort-cpu`
writes on purpose: UINT8 activations with zero points, Q/DQ around every op with an integer kernel).

Each rule is a function returning the places that break it ((node name, message) pairs), with a severity: `error` for what makes
TensorRT refuse the model (parser hard rules) or what onnxq promises (every weighted layer fully
quantized), `warning` for placement advice whose violation costs speed, not correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.conv import is_image_stem
from onnxq.ir.graph import WEIGHTED_OPS, attr, const_array, is_const, opset_version
from onnxq.ir.linear import is_weight
from onnxq.quant.bias_range import int32_bias_overflow
from onnxq.quant.qdq_rules import DATA_MOVEMENT

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_QUANT_TYPES = {ir.DataType.INT8, ir.DataType.INT4, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT4E2M1}
_QOPERATOR = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
              "QLinearAdd", "QLinearMul", "QGemm", "BitShift", "Mod"}


@dataclass
class RuleResult:
    rule: str
    title: str
    severity: str  # "error" | "warning"
    violations: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # the node each violation is at ("" for the model)

    @property
    def status(self) -> str:
        if not self.violations:
            return "pass"
        return "FAIL" if self.severity == "error" else "warn"


def _qdq_nodes(graph: ir.Graph):
    return [n for n in graph if n.op_type in _QDQ]


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    value = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
    if value.dtype is not None:
        return value.dtype
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None:
        return zp.dtype
    named = attr(node, "output_dtype", 0)  # opset 21
    return ir.DataType(named) if named else ir.DataType.UINT8  # ONNX default is uint8


def rule_zero_point(graph):
    out = []
    for n in _qdq_nodes(graph):
        zp = const_array(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] is not None else None
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            out.append((n.name, f"{n.name}: zero point {zp.ravel()[:4]}"))
    return out


def rule_types(graph):
    return [(n.name, f"{n.name}: {_quantized_type(n).name}") for n in _qdq_nodes(graph)
            if _quantized_type(n) not in _QUANT_TYPES]


def rule_scales(graph):
    out = []
    for n in _qdq_nodes(graph):
        scale = const_array(n.inputs[1])
        if scale is None:
            out.append((n.name, f"{n.name}: scale '{n.inputs[1].name}' is computed at run time, not a constant"))
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            out.append((n.name, f"{n.name}: scale not strictly positive and finite"))
        elif scale.ndim == 1 and attr(n, "block_size", 0) == 0:
            data = n.inputs[0]
            axis = attr(n, "axis", 1)
            if data.shape is not None and axis < len(data.shape) and isinstance(data.shape[axis], int) \
                    and data.shape[axis] != scale.size:
                out.append((n.name, f"{n.name}: {scale.size} scales for dimension {axis} of size {data.shape[axis]}"))
    return out


def _on_weight(node: ir.Node) -> bool:
    """Q of a constant, DQ of a constant, or DQ of the Q of a constant: weight (de)quantization."""
    source = node.inputs[0]
    if node.op_type == "DequantizeLinear" and source.producer() is not None and source.producer().op_type == "QuantizeLinear":
        source = source.producer().inputs[0]
    return is_const(source)


def rule_per_axis_weights_only(graph):
    out = []
    for n in _qdq_nodes(graph):
        scale = const_array(n.inputs[1])
        if scale is not None and scale.size > 1 and not _on_weight(n):
            out.append((n.name, f"{n.name}: per-axis scale on an activation"))
    return out


def rule_int4_weights_only(graph):
    return [(n.name, f"{n.name}: INT4 on an activation") for n in _qdq_nodes(graph)
            if _quantized_type(n) == ir.DataType.INT4 and not _on_weight(n)]


def rule_no_qoperator(graph):
    return [(n.name, f"{n.name}: {n.op_type}") for n in graph if n.op_type in _QOPERATOR]


def rule_opset(model):
    v = opset_version(model)
    return [] if v >= 13 else [("", f"opset {v}")]


def rule_fp8_opset(model):
    """FLOAT8 types exist in QuantizeLinear/DequantizeLinear from opset 19, QuantizeLinear's
    output_dtype (the type without a zero point) from opset 21."""
    v = opset_version(model)
    nodes = _qdq_nodes(model.graph)
    fp8 = [n.name for n in nodes if _quantized_type(n) == ir.DataType.FLOAT8E4M3FN]
    named = [n.name for n in nodes if n.op_type == "QuantizeLinear" and attr(n, "output_dtype", 0)]
    if fp8 and v < 19:
        return [(fp8[0], f"opset {v} with {len(fp8)} FP8 Q/DQ nodes")]
    return [(named[0], f"opset {v} with output_dtype on {len(named)} QuantizeLinear nodes")] if named and v < 21 else []


def rule_fp8_without_zero_point(graph):
    """An FP8 zero point is 0 and says nothing; ONNX Runtime's Relu/Clip fusions misread it (a Relu
    before the Q is dropped, a Clip fails to load), so onnxq writes FP8 Q/DQ without one."""
    return [(n.name, f"{n.name}: FP8 with a zero-point input") for n in _qdq_nodes(graph)
            if _quantized_type(n) == ir.DataType.FLOAT8E4M3FN and len(n.inputs) > 2 and n.inputs[2] is not None]


def rule_fp8_saturate(graph):
    """TensorRT's FP8 quantization clamps to ±448 (saturate=1, ONNX's default); saturate=0 asks for NaN."""
    return [(n.name, f"{n.name}: saturate=0") for n in graph if n.op_type == "QuantizeLinear"
            and _quantized_type(n) == ir.DataType.FLOAT8E4M3FN and attr(n, "saturate", 1) == 0]


def rule_fp8_pairs(graph):
    """A weighted layer's quantized inputs are both FP8 or neither: TensorRT has FP8×FP8 kernels, but
    none that mixes FP8 with INT8 (INT4 or INT8 weights with INT8 activations are W4A8 / W8A8)."""
    out = []
    for n in graph:
        if n.op_type not in WEIGHTED_OPS:
            continue
        types = {_quantized_type(v.producer()) for v in n.inputs[:2] if _from_dq(v)}
        if len(types) > 1 and ir.DataType.FLOAT8E4M3FN in types:
            out.append((n.name, f"{n.op_type} '{n.name}': inputs of {' and '.join(sorted(t.name for t in types))}"))
    return out


def rule_weight_range(graph):
    out = []
    for n in graph:
        if n.op_type == "DequantizeLinear":
            q = const_array(n.inputs[0])
            if q is not None and q.dtype == np.int8 and q.size and q.min() < -127:
                out.append((n.name, f"{n.name}: weight code -128 (TensorRT expects [-127, 127])"))
    return out


def rule_q_dq_pairs(graph):
    out = []
    for n in graph:
        if n.op_type != "QuantizeLinear":
            continue
        for user in n.outputs[0].consumers():
            if user.op_type != "DequantizeLinear":
                out.append((n.name, f"{n.name}: quantized output read by {user.op_type} '{user.name}'"))
            elif not _same_params(n, user):
                out.append((n.name, f"{n.name} → {user.name}: scale or zero point differ"))
        if n.outputs[0].is_graph_output():
            out.append((n.name, f"{n.name}: quantized tensor is a graph output"))
    return out


def _same_params(q: ir.Node, dq: ir.Node) -> bool:
    for i in (1, 2):
        a = const_array(q.inputs[i]) if len(q.inputs) > i and q.inputs[i] is not None else None
        b = const_array(dq.inputs[i]) if len(dq.inputs) > i and dq.inputs[i] is not None else None
        if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
            return False
    return True


def _from_dq(value: ir.Value | None) -> bool:
    return value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"


def _is_activation_product(node: ir.Node) -> bool:
    """A MatMul of two activations (attention's Q·Kᵀ and P·V): no weight on either side."""
    return node.op_type == "MatMul" and not any(is_weight(v) for v in node.inputs[:2])


def rule_weighted_inputs(graph, ops=WEIGHTED_OPS, allowed_float=lambda node: False):
    out = []
    for n in graph:
        if n.op_type in ops and not _is_activation_product(n) and not allowed_float(n):
            for i, v in enumerate(n.inputs[:2]):
                if v is not None and not _from_dq(v):
                    out.append((n.name, f"{n.op_type} '{n.name}': input {i} '{v.name}' not quantized"))
    return out


def rule_activation_products(graph):
    """TensorRT runs an activation×activation MatMul in higher precision when its inputs carry no
    Q/DQ (ModelOpt itself leaves attention BMMs unquantized beyond 512 keys): allowed, but said."""
    return [(n.name, f"MatMul '{n.name}': input {i} '{v.name}' not quantized (runs in float)")
            for n in graph if _is_activation_product(n)
            for i, v in enumerate(n.inputs[:2]) if v is not None and not _from_dq(v)]


def rule_weighted_output_not_quantized(graph):
    """A Q right on a weighted layer's output is needed only when the next weighted layer (or a
    residual Add) reads it; before anything else (an activation, a norm) it costs a fusion."""
    out = []
    for n in graph:
        producer = n.inputs[0].producer() if n.op_type == "QuantizeLinear" else None
        if producer is None or producer.op_type not in WEIGHTED_OPS:
            continue
        readers = [u for dq in n.outputs[0].consumers() for u in dq.outputs[0].consumers()]
        if not any(u.op_type in WEIGHTED_OPS or u.op_type == "Add" for u in readers):
            read_by = sorted({u.op_type for u in readers})
            text = f"{n.name}: Q on the output of {producer.op_type} '{producer.name}' read only by {read_by}"
            out.append((producer.name, text))
    return out


def rule_residual_add(graph):
    out = []
    for n in graph:
        if n.op_type != "Add" or len(n.inputs) != 2 or any(is_const(v) for v in n.inputs):
            continue
        producers = [v.producer().op_type if v.producer() is not None else None for v in n.inputs]
        if any(p in WEIGHTED_OPS for p in producers):
            other = n.inputs[1] if producers[0] in WEIGHTED_OPS else n.inputs[0]
            if not _from_dq(other):
                out.append((n.name, f"Add '{n.name}': residual input '{other.name}' not quantized"))
    return out


def rule_copy_ops(graph):
    return [(n.inputs[0].producer().name, f"{n.name}: Q/DQ around {n.inputs[0].producer().op_type} '{n.inputs[0].producer().name}'")
            for n in graph if n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type in DATA_MOVEMENT and _from_dq(n.inputs[0].producer().inputs[0])]


def rule_concat_scales(graph):
    out = []
    for n in graph:
        if n.op_type == "Concat":
            scales = set()
            for v in [*n.inputs, n.outputs[0]]:
                scales |= _tensor_scales(v)
            if len(scales) > 1:
                out.append((n.name, f"Concat '{n.name}': {len(scales)} different scales"))
    return out


def _tensor_scales(value: ir.Value) -> set[float]:
    """Per-tensor scales with which `value` is quantized: by the DQ producing it or Qs reading it."""
    nodes = [value.producer()] if _from_dq(value) else []
    nodes += [u for u in value.consumers() if u.op_type == "QuantizeLinear"]
    scales = (const_array(n.inputs[1]) for n in nodes)
    return {float(s) for s in scales if s is not None and s.size == 1}


def rule_embedding_tables(graph):
    """A DQ of a constant read as a Gather's data is weight-only quantization of a table: INT8, and
    per-axis scales only along the gathered axis (each gathered row keeps its own scale). A DQ of an
    activation (a Q/DQ pair before a Gather that picks a token or splits heads) is not a table."""
    out = []
    for n in graph:
        dq = n.inputs[0].producer() if n.op_type == "Gather" and n.inputs[0] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or not is_const(dq.inputs[0]):
            continue
        scale = const_array(dq.inputs[1])
        if _quantized_type(dq) != ir.DataType.INT8:
            out.append((n.name, f"Gather '{n.name}': table DQ '{dq.name}' is not of an INT8 table"))
        elif scale is not None and scale.size > 1 and (attr(dq, "block_size", 0) or attr(dq, "axis", 1) != attr(n, "axis", 0)):
            out.append((n.name, f"Gather '{n.name}': table DQ '{dq.name}' has per-axis scales off the gathered axis"))
    return out


def rule_int32_biases(graph):
    """ONNX Runtime re-quantizes the float bias of a DQ-fed Conv/Gemm to int32 steps of s_x·s_w and wraps
    past int32's range (onnxq.quant.bias_range): that layer then computes garbage in ONNX Runtime."""
    found = []
    for n in graph:
        worst = int32_bias_overflow(n)
        if worst is not None:
            found.append((n.name, f"{n.op_type} '{n.name}': bias up to {worst:.2g} steps of s_x·s_w (int32 ends at 2.1e9)"))
    return found


_ORT_INTEGER_WEIGHTED = frozenset({"Conv", "Gemm", "MatMul"})  # ORT's CPU provider has no integer ConvTranspose


def rule_ort_weighted_inputs(graph):
    """As R8, less the image stem that `--target ort-cpu` leaves float on purpose (a Conv over at
    most 4 channels read straight from the model input: ORT's float Conv is faster there)."""
    return rule_weighted_inputs(graph, _ORT_INTEGER_WEIGHTED, allowed_float=is_image_stem)


def rule_integer_types(graph):
    """ONNX Runtime's CPU kernels are integer ones: an FP8 Q/DQ runs as a float copy, never fused."""
    return [(n.name, f"{n.name}: {_quantized_type(n).name}") for n in _qdq_nodes(graph)
            if _quantized_type(n) not in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
                                          ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32)]


def rule_signed_weights(graph):
    """ONNX Runtime's x86 integer kernels are fastest with unsigned activations and signed weights
    (U8S8); constant operands of elementwise ops (Add, Mul) are UINT8 like the activations they meet."""
    return [(n.name, f"{n.name}: {_quantized_type(n).name} weight of {user.op_type} '{user.name}'")
            for n in graph if n.op_type == "DequantizeLinear" and _on_weight(n)
            and _quantized_type(n) not in (ir.DataType.INT8, ir.DataType.INT4)
            for user, index in n.outputs[0].uses() if user.op_type in _ORT_INTEGER_WEIGHTED and index == 1]


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: str  # "error" | "warning"
    check: Callable
    targets: tuple[str, ...]  # the lint profiles (deployment targets) the rule belongs to
    whole_model: bool = False  # the check reads the model (opsets), not only the graph


_BOTH = ("tensorrt", "ort-cpu")
_TRT = ("tensorrt",)
_ORT = ("ort-cpu",)

# One table for every profile. ort-cpu models are asymmetric UINT8 with Q/DQ around every op that has
# an integer kernel (docs/ort-cpu.md), so TensorRT's symmetric-INT8 and placement rules are not theirs.
RULES: list[Rule] = [
    Rule("R1", "zero points are 0 (symmetric quantization)", "error", rule_zero_point, _TRT),
    Rule("R1b", "quantized types are INT8/INT4/FP8 (no UINT8)", "error", rule_types, _TRT),
    Rule("R2", "scales are positive build-time constants of a valid shape", "error", rule_scales, _BOTH),
    Rule("R3", "per-axis scales only on weights", "error", rule_per_axis_weights_only, _BOTH),
    Rule("R3b", "INT4 only on weights", "error", rule_int4_weights_only, _BOTH),
    Rule("R4", "no QOperator or integer-only ops (QLinear*, *Integer, BitShift, Mod)", "error", rule_no_qoperator, _TRT),
    Rule("R5", "opset >= 13", "error", rule_opset, _BOTH, whole_model=True),
    Rule("R6", "INT8 weights within [-127, 127]", "warning", rule_weight_range, _TRT),
    Rule("F1", "FP8 Q/DQ at opset >= 19, QuantizeLinear output_dtype at opset >= 21", "error", rule_fp8_opset, _BOTH,
         whole_model=True),
    Rule("F2", "FP8 QuantizeLinear saturates (saturate=1)", "error", rule_fp8_saturate, _TRT),
    Rule("F3", "a weighted layer's quantized inputs are both FP8 or neither", "error", rule_fp8_pairs, _TRT),
    Rule("F4", "FP8 Q/DQ carry no zero-point input (ONNX Runtime misreads one after Relu/Clip)", "warning",
         rule_fp8_without_zero_point, _BOTH),
    Rule("O1", "weights are signed INT8/INT4 (ORT's U8S8 kernels)", "warning", rule_signed_weights, _ORT),
    Rule("O3", "quantized types are integers (ORT's CPU kernels have no FP8)", "error", rule_integer_types, _ORT),
    Rule("QDQ", "every Q feeds only DQs with the same scale and zero point", "error", rule_q_dq_pairs, _BOTH),
    Rule("R8", "every input of a weighted Conv/ConvTranspose/Gemm/MatMul is quantized", "error", rule_weighted_inputs,
         _TRT),
    Rule("R8o", "every input of a weighted Conv/Gemm/MatMul is quantized (ORT has no integer ConvTranspose; "
                "an image stem may stay float)", "error",
         rule_ort_weighted_inputs, _ORT),
    Rule("R8b", "activation x activation MatMuls (attention) are quantized", "warning", rule_activation_products, _BOTH),
    Rule("R9", "weighted-layer outputs are not quantized directly", "warning", rule_weighted_output_not_quantized, _TRT),
    Rule("R11", "residual input of an Add after a weighted layer is quantized", "warning", rule_residual_add, _TRT),
    Rule("R15", "no Q/DQ on data-movement ops", "warning", rule_copy_ops, _TRT),
    Rule("R16", "Concat inputs and output share one scale", "error", rule_concat_scales, _TRT),
    Rule("O2", "biases of DQ-fed Conv/Gemm fit ONNX Runtime's int32 re-quantization", "warning", rule_int32_biases,
         _BOTH),
    Rule("R17", "embedding tables (DQ into Gather data) are constant INT8, per tensor or per gathered row", "error",
         rule_embedding_tables, _BOTH),
]
LINT_TARGETS = _BOTH


def lint(model: ir.Model, target: str = "tensorrt") -> list[RuleResult]:
    """Every rule of `target`'s profile, in table order, with the places that break it."""
    if target not in LINT_TARGETS:
        raise OnnxqError(f"no lint profile for target '{target}' (choose from {', '.join(LINT_TARGETS)})")
    results = []
    for rule in RULES:
        if target in rule.targets:
            found = rule.check(model if rule.whole_model else model.graph)
            results.append(RuleResult(rule.id, rule.title, rule.severity, [text for _, text in found],
                                      [node for node, _ in found]))
    return results


def passed(results: list[RuleResult]) -> bool:
    return all(r.status != "FAIL" for r in results)
