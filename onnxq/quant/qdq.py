"""QDQ planning and insertion.

Planning walks the graph once and asks the target's rule table (onnxq.quant.qdq_rules) what each node
needs. The result says which activation tensors get a Q/DQ pair (and for which readers), which
weights get an integer copy with a DequantizeLinear, which tensors must share a scale, and why each
remaining node stays in float. Insertion then builds the nodes with names derived from the tensors
they quantize (`x` → `x_QuantizeLinear`, `x_quantized`, `x_dequantized`, `x_scale`), and tags every
node with what was done to it (metadata `onnxq.*`, shown by Netron and `onnxq inspect`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import WEIGHTED_OPS, Namer, add_initializer, const_tensor, is_const
from onnxq.quant.qdq_rules import Treatment

MASK_CONSTANT = 1e4  # constants at least this large in magnitude are masks or sentinels, not data
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
# ops through which a mask's huge constant survives unchanged in magnitude
_MASK_CARRIERS = {"Add", "Sub", "Mul", "Where", "Cast", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Slice",
                  "Transpose", "Min", "Max", "Neg", "Identity", "Tile", "Gather", "ConstantOfShape", "Trilu"}

Slot = tuple[ir.Node, int]


@dataclass
class Plan:
    activations: dict[ir.Value, set[Slot]] = field(default_factory=lambda: defaultdict(set))
    weights: dict[tuple[ir.Value, int | None], list[Slot]] = field(default_factory=lambda: defaultdict(list))
    tables: dict[ir.Value, list[Slot]] = field(default_factory=lambda: defaultdict(list))  # embedding tables, INT8 per row
    float_reasons: dict[ir.Node, str] = field(default_factory=dict)
    scale_groups: list[set[ir.Value]] = field(default_factory=list)
    skipped: dict[ir.Value, str] = field(default_factory=dict)  # activations left float after calibration
    range_of: dict[ir.Value, ir.Value] = field(default_factory=dict)  # quantize with another tensor's range
    idle_dropped: int = 0  # planned pairs the target dropped as idle (ort-cpu: no integer kernel beside them)


class Planner:
    """Collects the QDQ decisions that a rule table makes node by node."""

    def __init__(self, graph: ir.Graph, table: dict[str, Treatment], *, exclude: Iterable[str] = (),
                 unknown_ops: str = "error", target: str = "", quantize_tables: bool = False):
        self.graph = graph
        self.quantize_tables = quantize_tables  # embedding tables (Gather data) to INT8 per row
        self.table = table
        self.exclude = set(exclude)
        self.unknown_ops = unknown_ops
        self.target = target
        self.plan = Plan()
        self.masked = mask_tainted(graph)
        self._group_of: dict[ir.Value, set[ir.Value]] = {}

    def unknown(self) -> list[str]:
        """Op types (domain::op for custom domains) that have no entry in the rule table."""
        found = []
        for node in self.graph:
            if node.name not in self.exclude and (node.domain not in ("", "ai.onnx") or node.op_type not in self.table):
                op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
                if op not in found:
                    found.append(op)
        return found

    def run(self) -> Plan:
        for node in list(self.graph):
            if node.name in self.exclude:
                self.keep_float(node, "excluded by the user")
                continue
            treatment = self.table.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if treatment is None:
                op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
                if self.unknown_ops != "float":
                    raise OnnxqError(f"op {op} (node '{node.name}') has no QDQ rule for target '{self.target}'; "
                                     "keep such ops in float with --allow-unknown-ops")
                self.keep_float(node, f"no QDQ rule for {op}: kept in float (--allow-unknown-ops)")
                continue
            treatment.plan(node, self)
        self.plan.scale_groups = [g for g in {id(g): g for g in self._group_of.values()}.values()]
        return self.plan

    # --- what treatments call ---------------------------------------------------------------------

    def activation(self, node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        if value is None or not self.is_float_data(value) or _is_dequantized(value):
            return
        if value in self.masked:
            self.plan.skipped[value] = "carries an attention-mask constant (huge magnitude): quantizing it would wipe out the data"
            return
        self.plan.activations[value].add((node, index))

    def output(self, node: ir.Node) -> None:
        for value in node.outputs:
            if self.is_float_data(value) and value not in self.masked:
                for user, index in value.uses():
                    self.plan.activations[value].add((user, index))

    def use_range_of(self, value: ir.Value, source: ir.Value) -> None:
        self.plan.range_of[value] = source

    def weight(self, node: ir.Node, index: int, axis: int | None) -> None:
        self.plan.weights[(node.inputs[index], axis)].append((node, index))

    def embedding_table(self, node: ir.Node) -> None:
        self.plan.tables[node.inputs[0]].append((node, 0))

    def keep_float(self, node: ir.Node, reason: str) -> None:
        self.plan.float_reasons[node] = reason

    def reject(self, message: str) -> None:
        raise OnnxqError(message)

    def share_scale(self, values: Iterable[ir.Value | None]) -> None:
        group: set[ir.Value] = set()
        for v in values:
            if v is not None and self.is_float_data(v):
                group |= self._group_of.get(v, {v})
        for v in group:
            self._group_of[v] = group

    def is_float_data(self, value: ir.Value) -> bool:
        return value.dtype in _FLOAT_TYPES and not is_const(value)

    def is_weighted_output(self, value: ir.Value | None) -> bool:
        """Output of a weighted layer, possibly through its bias Add (what TensorRT fuses with)."""
        producer = value.producer() if value is not None else None
        if producer is None:
            return False
        if producer.op_type in WEIGHTED_OPS:
            return True
        if producer.op_type == "Add" and len(producer.inputs) == 2:
            a, b = producer.inputs
            for x, bias in ((a, b), (b, a)):
                if is_const(bias) and x is not None and x.producer() is not None \
                        and x.producer().op_type in WEIGHTED_OPS:
                    return True
        return False


def _is_dequantized(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def mask_tainted(graph: ir.Graph) -> set[ir.Value]:
    """Tensors that carry an attention mask's huge constant (e.g. finfo.min or -10000).

    They start where such a constant enters arithmetic and follow the ops that keep its magnitude;
    Softmax (or any other op) ends them, since its output is ordinary data again.
    """
    tainted: set[ir.Value] = set()
    for node in graph:  # graph order is topological
        if node.op_type not in _MASK_CARRIERS:
            continue
        carries = any(v in tainted for v in node.inputs if v is not None) or any(
            _is_mask_constant(v) for v in node.inputs if v is not None)
        if node.op_type == "ConstantOfShape":
            value = node.attributes.get("value")
            carries = value is not None and _is_huge(value.value.numpy())
        if carries:
            tainted.update(node.outputs)
    return tainted


def _is_mask_constant(value: ir.Value) -> bool:
    tensor = const_tensor(value)  # size first: a weight is never read for this
    if tensor is None or tensor.size > 16:
        return False
    return _is_huge(tensor.numpy())


def _is_huge(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and bool(np.any(~np.isfinite(array) | (np.abs(array) >= MASK_CONSTANT)))


# --- numbers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A quantization format: the ONNX data type stored and the clamp range of x / scale."""

    dtype: ir.DataType
    qmin: float
    qmax: float

    @property
    def numpy(self) -> np.dtype:
        return self.dtype.numpy()

    def to_grid(self, steps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """`steps` (x / scale) on the format's grid, as floats (in place into `out` when given)."""
        raise NotImplementedError


@dataclass(frozen=True)
class IntFormat(Format):
    """An integer format: steps are rounded half to even, then clamped to [qmin, qmax]."""

    def to_grid(self, steps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.round(steps, out=out)
        return np.clip(out, self.qmin, self.qmax, out=out)


@dataclass(frozen=True)
class FloatFormat(Format):
    """A floating-point format (FP8 E4M3): x / scale is clamped to ±qmax and cast to the nearest value
    the format holds, ties to even, as TensorRT and ONNX's saturating QuantizeLinear do. Its steps are
    relative (3 mantissa bits), so a quantized value is within 1/16 of itself above s·2⁻⁶ and within
    s·2⁻¹⁰ below, up to ±qmax·s.

    Its Q/DQ nodes carry no zero point: QuantizeLinear names the type in `output_dtype` (opset 21).
    A zero point is 0 anyway, and ONNX Runtime's Relu/Clip-into-QuantizeLinear fusions misread an FP8
    one (up to 1.31 at least: a Relu before it is dropped, negative values pass; a Clip fails to load)."""

    def to_grid(self, steps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.clip(steps, self.qmin, self.qmax, out=out)
        out[...] = out.astype(self.numpy)  # ml_dtypes rounds to nearest even
        return out


INT8 = IntFormat(ir.DataType.INT8, -128, 127)
UINT8 = IntFormat(ir.DataType.UINT8, 0, 255)
# Weights use the symmetric range [-127, 127]: TensorRT's INT8 weight grid (lint rule R6).
INT8_WEIGHT = IntFormat(ir.DataType.INT8, -127, 127)
INT4 = IntFormat(ir.DataType.INT4, -8, 7)
UINT4 = IntFormat(ir.DataType.UINT4, 0, 15)
INT4_WEIGHT = IntFormat(ir.DataType.INT4, -7, 7)
FP8 = FloatFormat(ir.DataType.FLOAT8E4M3FN, -448.0, 448.0)  # activations and weights alike


def activation_format(bits: int, signed: bool, number_format: str = "int8") -> Format:
    if number_format == "fp8":
        return FP8
    return {(8, True): INT8, (8, False): UINT8, (4, True): INT4, (4, False): UINT4}[(bits, signed)]


def activation_params(lo: float, hi: float, fmt: Format, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) for an activation range."""
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return (amax / fmt.qmax if amax > 0 else 1.0), 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (fmt.qmax - fmt.qmin) if hi > lo else 1.0
    zero_point = int(np.clip(round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax))
    return scale, zero_point


def quantize_weight(w: np.ndarray, axis: int | None, fmt: Format = INT8_WEIGHT, method: str = "max",
                    block_size: int = 0, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer weights and scales: per tensor (axis None), per channel, or in blocks along the
    input axis (block_size > 0; scales then have w's rank). Returns (q, scale). `importance` (blocks
    with mse only): one non-negative weight per input, Σx² of what that input multiplies over the
    calibration data, so a block's clipping minimises its share of the layer's output error rather than
    of the weights'."""
    w = np.asarray(w, dtype=np.float32)
    if not np.isfinite(w).all():  # would cast to arbitrary integers: the float model itself is broken
        raise OnnxqError(f"a weight of shape {list(w.shape)} holds NaN or infinite values; fix the float model first")
    if block_size:
        return _quantize_blocked(w, axis, fmt, method, block_size, importance)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    amax = np.abs(w).max(axis=reduce_axes, keepdims=axis is not None)
    if method == "auto":  # clipping pays per tensor (one outlier sets the step); per channel it costs
        method = "max" if axis is not None else "mse"
    if method == "mse":
        amax = _mse_weight_amax(w, amax, reduce_axes, fmt)
    elif method != "max":
        raise OnnxqError(f"unknown weight calibrator '{method}' (choose max, mse or auto)")
    scale = np.where(amax > 0, amax / fmt.qmax, 1.0).astype(np.float32)
    steps = np.divide(w, scale)  # put on the grid in place: one float temporary of the weight's size
    fmt.to_grid(steps, out=steps)
    return steps.astype(fmt.numpy), (scale.reshape(-1) if axis is not None else scale.reshape(()))


def scale_per_element(scale: np.ndarray, shape: tuple, axis: int | None, block_size: int = 0) -> np.ndarray:
    """quantize_weight's scales broadcast to the weight's shape (per tensor, per channel or per block)."""
    if block_size:  # scales have the weight's rank, one entry per block along the input axis
        return np.repeat(scale, block_size, axis=1 - axis)
    if axis is None:
        return np.broadcast_to(scale, shape)
    return np.broadcast_to(scale.reshape([-1 if i == axis else 1 for i in range(len(shape))]), shape)


MSE_CHUNK_ELEMENTS = 1 << 20  # weight elements searched at a time: bounds the search's temporaries


def _mse_weight_amax(w, amax, reduce_axes, fmt, steps: int = 40, chunk_elements: int = MSE_CHUNK_ELEMENTS):
    """Per-channel (or per-tensor) clipping of weights that minimises the squared rounding error.

    Each candidate amax·r (r in [0.5, 1]) is scored by Σ (Q(w) − w)² over the channel; the search runs on
    blocks of whole channels of at most `chunk_elements` weights, so its temporaries stay that size
    whatever the weight's (channels are independent: the result is the same as in one piece). Per tensor,
    a weight above that size is scored as the sum of its row blocks' errors."""
    if w.size <= chunk_elements:
        return _mse_search(w, amax, reduce_axes, fmt, steps)
    if amax.ndim == 0:  # per tensor: errors add over row blocks
        rows = np.reshape(w, (w.shape[0], -1)) if w.ndim > 1 else w.reshape(-1, 1)
        step = max(1, chunk_elements // max(rows.shape[1], 1))
        errors = np.sum([_candidate_errors(rows[i:i + step], amax, None, fmt, steps)
                         for i in range(0, rows.shape[0], step)], axis=0)
        return _best_candidate(amax, errors, steps)
    axis = next(i for i in range(w.ndim) if i not in reduce_axes)
    step = max(1, chunk_elements * w.shape[axis] // w.size)
    index = [slice(None)] * w.ndim
    parts = []
    for start in range(0, w.shape[axis], step):
        index[axis] = slice(start, start + step)
        parts.append(_mse_search(w[tuple(index)], amax[tuple(index)], reduce_axes, fmt, steps))
    return np.concatenate(parts, axis=axis)


def _mse_search(w, amax, reduce_axes, fmt, steps):
    return _best_candidate(amax, _candidate_errors(w, amax, reduce_axes, fmt, steps), steps)


def _candidate_errors(w, amax, reduce_axes, fmt, steps, weights=None) -> list:
    """Σ (Q(w) − w)² over `reduce_axes` for each candidate clipping amax·r, r in linspace(0.5, 1, steps);
    each squared error times `weights` (broadcast to w) where given."""
    keepdims = reduce_axes is not None and amax.ndim > 0
    errors = []
    # one weight-sized buffer, reused by every candidate in place (the same operations as
    # ((clip(round(w / s)) · s − w)²).sum(), without a fresh temporary per step)
    buffer = None
    for ratio in np.linspace(0.5, 1.0, steps):
        candidate = amax * ratio
        scale = np.where(candidate > 0, candidate / fmt.qmax, 1.0)
        if buffer is None:
            buffer = np.empty(np.shape(w), dtype=np.result_type(w, scale))
        np.divide(w, scale, out=buffer)
        fmt.to_grid(buffer, out=buffer)
        buffer *= scale
        buffer -= w
        buffer *= buffer
        if weights is not None:
            buffer *= weights
        errors.append(buffer.sum(axis=reduce_axes, keepdims=keepdims))
    return errors


def _best_candidate(amax, errors, steps):
    """The candidate with the least error (the first among equals), channel by channel."""
    best_amax, best_err = None, None
    for ratio, err in zip(np.linspace(0.5, 1.0, steps), errors):
        candidate = amax * ratio
        if best_err is None:
            best_amax, best_err = candidate, err
        else:
            better = err < best_err
            best_amax = np.where(better, candidate, best_amax)
            best_err = np.where(better, err, best_err)
    return best_amax


def _quantize_blocked(w, axis, fmt, method, block_size, importance=None):
    # blocks run along the reduction (input) axis, which is the axis other than the output channel
    if w.ndim != 2 or axis is None:
        raise OnnxqError("blocked weight quantization needs a 2-D weight with a channel axis")
    block_axis = 1 - axis
    n = w.shape[block_axis]
    if n % block_size:
        raise OnnxqError(f"weight dimension {n} is not a multiple of block size {block_size}")
    moved = np.moveaxis(w, block_axis, 0).reshape(n // block_size, block_size, -1)
    amax = np.abs(moved).max(axis=1, keepdims=True)
    if method == "mse":  # "auto" keeps max: a block's 32 weights have no lone outlier to clip
        amax = _mse_blocks(moved, amax, fmt, _error_weights(importance, block_size))
    scale = np.where(amax > 0, amax / fmt.qmax, 1.0).astype(np.float32)
    q = fmt.to_grid(moved / scale)
    q = np.moveaxis(q.reshape(n, -1), 0, block_axis).astype(fmt.numpy)
    scale = np.moveaxis(scale.reshape(n // block_size, -1), 0, block_axis)
    return q, scale


def _error_weights(importance, block_size):
    """`importance` as (blocks, block_size, 1) weights of the squared errors, floored at 1e-6 of its mean so a
    block whose inputs never fired is clipped as plain mse would clip it, not at whatever tie comes first;
    None without importance (or with none anywhere)."""
    if importance is None:
        return None
    importance = np.asarray(importance, dtype=np.float64)
    mean = importance.mean()
    if not mean > 0:
        return None
    return (importance + 1e-6 * mean).astype(np.float32).reshape(-1, block_size, 1)


def _mse_blocks(moved, amax, fmt, weights, steps: int = 40):
    """Per-block clipping of (blocks, block_size, channels) weights, searched a few channels at a time
    (blocks are independent), so the temporaries stay within MSE_CHUNK_ELEMENTS."""
    step = max(1, MSE_CHUNK_ELEMENTS // (moved.shape[0] * moved.shape[1]))
    parts = []
    for start in range(0, moved.shape[2], step):
        part, top = moved[:, :, start:start + step], amax[:, :, start:start + step]
        parts.append(_best_candidate(top, _candidate_errors(part, top, (1,), fmt, steps, weights), steps))
    return np.concatenate(parts, axis=2)


# --- insertion --------------------------------------------------------------------------------------


def insert_activation_qdq(graph: ir.Graph, namer: Namer, value: ir.Value, slots: Iterable[Slot], scale: float,
                          zero_point: int, fmt: Format) -> None:
    """Q→DQ on `value`, read by `slots` instead of `value`; other readers keep the float tensor."""
    base = value.name
    scale_v = add_initializer(graph, namer, f"{base}_scale", scale_like(scale, value))
    params, attributes = [scale_v], {}
    if isinstance(fmt, FloatFormat):  # the type as an attribute: see _float_params
        attributes = {"output_dtype": fmt.dtype.value}
    else:
        params.append(add_initializer(graph, namer, f"{base}_zero_point", np.array(zero_point, dtype=fmt.numpy)))
    q = ir.node("QuantizeLinear", [value, *params], attributes, name=namer.fresh(f"{base}_QuantizeLinear"))
    q.outputs[0].name = namer.fresh(f"{base}_quantized")
    q.outputs[0].dtype = fmt.dtype
    q.outputs[0].shape = value.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], *params], name=namer.fresh(f"{base}_DequantizeLinear"))
    dq.outputs[0].name = namer.fresh(f"{base}_dequantized")
    dq.outputs[0].dtype = value.dtype
    dq.outputs[0].shape = value.shape
    graph.extend([q, dq])
    for node, index in slots:
        node.replace_input_with(index, dq.outputs[0])


def insert_weight_dq(graph: ir.Graph, namer: Namer, weight: ir.Value, slots: Iterable[Slot], q: np.ndarray,
                     scale: np.ndarray, axis: int | None, fmt: Format, block_size: int = 0,
                     zero_point: int = 0) -> None:
    """Integer copy of `weight` plus a DequantizeLinear read by `slots`; drops the float weight if unused.
    `q` already holds the stored codes (shifted by `zero_point`, which is 0 but for uint8 weights)."""
    base = weight.name
    q_v = add_initializer(graph, namer, f"{base}_quantized", q)
    scale_v = add_initializer(graph, namer, f"{base}_scale", scale_like(scale, weight))
    params = [scale_v]
    if not isinstance(fmt, FloatFormat):  # a DequantizeLinear takes its type from the stored weight
        params.append(add_initializer(graph, namer, f"{base}_zero_point", np.full(scale.shape, zero_point, dtype=fmt.numpy)))
    attributes = {}
    if block_size:
        attributes = {"axis": 1 - axis, "block_size": block_size}
    elif axis is not None:
        attributes = {"axis": axis}
    dq = ir.node("DequantizeLinear", [q_v, *params], attributes, name=namer.fresh(f"{base}_DequantizeLinear"))
    dq.outputs[0].name = namer.fresh(f"{base}_dequantized")
    dq.outputs[0].dtype = weight.dtype
    dq.outputs[0].shape = weight.shape
    graph.extend([dq])
    for node, index in slots:
        node.replace_input_with(index, dq.outputs[0])
    if not weight.uses() and weight.is_initializer() and not weight.is_graph_input():
        graph.initializers.pop(weight.name)


def scale_like(scale, value: ir.Value) -> np.ndarray:
    """`scale` in the float type of the tensor it (de)quantizes: QuantizeLinear needs x and its scale
    of one type, and DequantizeLinear returns the scale's type, which readers of an FP16 tensor expect.
    Float32 unless the tensor is FP16 or BF16 (opset 19); an FP16 scale is kept above zero."""
    if value.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return np.asarray(scale, dtype=np.float32)
    smallest = float(np.finfo(np.float16).smallest_subnormal)  # a scale must not round to zero
    return np.maximum(np.asarray(scale, dtype=np.float32), smallest).astype(value.dtype.numpy())


def tag(node: ir.Node, key: str, text: str) -> None:
    """Record on the node what onnxq did (metadata for tools, doc_string for Netron's sidebar)."""
    node.metadata_props[key] = text
    node.doc_string = f"onnxq: {text}"
