"""Building replacement subgraphs for nonlinear ops (used by dulut, qans and integer_ops).

`Builder` collects the nodes of one replacement, named after the node it replaces and tagged with
what they replace (node metadata `onnxq.replacement`); `emit_dulut` / `emit_lut8` write the ONNX
form of a lookup table (exactly the float32 operations of lut.py's `__call__`), and
`record_fidelity` appends the measured error of each replacement to the model's `onnxq.fidelity`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, const_array
from onnxq.metadata import FIDELITY_KEY, REPLACEMENT_KEY
from onnxq.passes.nonlinear.lut import DualLUT, UniformLUT


class Builder:
    """Collects the nodes of one replacement; names derive from the node it replaces.

    `b.op("Mul", x, b.const("scale", 0.5))` records a Mul on an onnx_ir tape and returns its output
    Value. Every node is tagged with what it replaces; `finish()` puts them in the graph and rewires
    the readers.
    """

    def __init__(self, graph: ir.Graph, namer: Namer, base: str, replaces: str):
        self.graph, self.namer, self.base, self.replaces = graph, namer, base, replaces
        self.tape = ir.tape.Tape()

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.tape.nodes)

    def const(self, suffix: str, array: Any, dtype=np.float32) -> ir.Value:
        return add_initializer(self.graph, self.namer, f"{self.base}_{suffix}", np.asarray(array, dtype=dtype))

    def op(self, op_type: str, *inputs: ir.Value | None, suffix: str | None = None, **attributes) -> ir.Value:
        label = suffix or op_type.lower()
        name = self.namer.fresh(f"{self.base}/{label}")
        out = ir.Value(name=self.namer.fresh(f"{self.base}_{label}"))
        self.tape.op(op_type, list(inputs), attributes or None, name=name, output=out,
                     metadata_props={REPLACEMENT_KEY: self.replaces})
        out.dtype = _result_type(op_type, list(inputs), attributes)
        return out

    def reduce(self, op_type: str, x: ir.Value, axis: int, opset: int, suffix: str) -> ir.Value:
        """ReduceMax/ReduceSum over one axis, keepdims: axes as an input from opset 18 (13 for ReduceSum)."""
        if opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, x, self.const(f"{suffix}_axes", [axis], np.int64), suffix=suffix, keepdims=1)
        return self.op(op_type, x, suffix=suffix, axes=[axis], keepdims=1)

    def qdq(self, x: ir.Value, scale: float) -> ir.Value:
        """Symmetric INT8 QuantizeLinear → DequantizeLinear on x (zero point 0, per tensor: TensorRT rules)."""
        s = self.const("scale", np.float32(scale))
        z = self.const("zero_point", 0, np.int8)
        return self.op("DequantizeLinear", self.op("QuantizeLinear", x, s, z, suffix="quantized"), s, z,
                       suffix="dequantized")

    def insert(self, before: ir.Node) -> None:
        """Put the collected nodes in the graph before `before` (no rewiring)."""
        self.graph.insert_before(before, self.nodes)

    def finish(self, before: ir.Node, old: ir.Value, new: ir.Value, remove: list[ir.Node] = ()) -> None:
        """Insert the nodes before `before`, make `new` take `old`'s readers and name, drop `remove`."""
        self.graph.insert_before(before, self.nodes)
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name = old.name
        old.name = self.namer.fresh(f"{name}_replaced")
        new.name = name
        new.dtype, new.shape = old.dtype, old.shape
        if remove:
            _shape_readers_to(new, old, remove)
            self.graph.remove(list(remove), safe=True)


def _shape_readers_to(new: ir.Value, old: ir.Value, remove) -> None:
    """Shape readers of a removed intermediate with the replaced value's shape (the exporter reads the
    shape of a norm's x·rsqrt product, say) read the replacement instead: its shape is the same."""
    for node in remove:
        for value in node.outputs:
            if value is old or value.shape is None or value.shape != old.shape:
                continue
            for user, index in list(value.uses()):
                if user.op_type == "Shape" and user not in remove:
                    user.replace_input_with(index, new)


_BOOLEAN_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or"}


def _result_type(op_type: str, inputs: list, attributes: dict) -> ir.DataType | None:
    """Element type of an emitted node's output (the checker needs it before shape inference)."""
    if op_type == "Cast":
        return ir.DataType(attributes["to"])
    if op_type in _BOOLEAN_OPS:
        return ir.DataType.BOOL
    if op_type == "Where":
        return inputs[1].dtype
    if op_type == "QuantizeLinear":
        return inputs[2].dtype
    if op_type == "DequantizeLinear":
        return inputs[1].dtype
    return inputs[0].dtype


def record_fidelity(model: ir.Model, entries: list[dict]) -> None:
    """Append per-op fidelity entries to the model's `onnxq.fidelity` metadata (read by inspect)."""
    if not entries:
        return
    previous = json.loads(model.metadata_props.get(FIDELITY_KEY, "[]"))
    model.metadata_props[FIDELITY_KEY] = json.dumps(previous + entries)


def emit_dulut(b: Builder, x: ir.Value, lut: DualLUT | UniformLUT) -> ir.Value:
    """The ONNX form of `lut(x)` (exactly the float32 operations of lut.py's `__call__`)."""
    c = b.op("Clip", x, b.const("lo", lut.lo), b.const("hi", lut.hi), suffix="clip")
    a = b.op("Mul", b.op("Sub", c, b.const("lo_shift", lut.lo), suffix="offset"), b.const("inv_step", lut.inv_step),
             suffix="position")
    if isinstance(lut, DualLUT):
        u = _lerp(b, a, lut.index, lut.index_slopes, "lut1")
        y = _lerp(b, u, lut.values, lut.value_slopes, "lut2")
    else:
        y = _lerp(b, a, lut.values, lut.slopes, "lut")
    left, right = lut.tails
    if right or left:
        t = b.op("Sub", x, c, suffix="overflow")
        if right:
            over = b.op("Relu", t, suffix="above")
            y = b.op("Add", y, over if right == 1.0 else b.op("Mul", over, b.const("right_slope", right)), suffix="right_tail")
        if left:
            under = b.op("Relu", b.op("Neg", t, suffix="neg_overflow"), suffix="below")
            y = b.op("Sub", y, b.op("Mul", under, b.const("left_slope", left)), suffix="left_tail")
    return y


def _lerp(b: Builder, a: ir.Value, values: np.ndarray, slopes: np.ndarray, name: str) -> ir.Value:
    """values[i] + (a - i) · slopes[i], i = min(floor(a), len - 2): Floor, Min, Sub, Cast, Gather×2, Mul, Add."""
    i = b.op("Min", b.op("Floor", a, suffix=f"{name}_floor"), b.const(f"{name}_last", len(values) - 2), suffix=f"{name}_cell")
    frac = b.op("Sub", a, i, suffix=f"{name}_frac")
    idx = b.op("Cast", i, suffix=f"{name}_index", to=ir.DataType.INT32)
    v = b.op("Gather", b.const(name, values), idx, suffix=f"{name}_value", axis=0)
    s = b.op("Gather", b.const(f"{name}_slope", slopes), idx, suffix=f"{name}_slope_value", axis=0)
    return b.op("Add", v, b.op("Mul", frac, s, suffix=f"{name}_step"), suffix=f"{name}_out")


def emit_lut8(b: Builder, x: ir.Value, table: np.ndarray, scale: float, zero_point: int, qmin: int) -> ir.Value:
    """T[code - qmin] for x = (code - zero_point)·scale: Mul(1/s), Round, Add, Cast, Gather."""
    code = b.op("Round", b.op("Mul", x, b.const("inv_scale", 1.0 / np.float32(scale)), suffix="codes"), suffix="code")
    idx = b.op("Cast", b.op("Add", code, b.const("code_offset", zero_point - qmin), suffix="table_index_f"),
               suffix="table_index", to=ir.DataType.INT32)
    return b.op("Gather", b.const("table", table), idx, suffix="table_value", axis=0)


def dq_params(value: ir.Value) -> tuple[float, int, int] | None:
    """(scale, zero_point, qmin) when `value` is a per-tensor INT8/UINT8 DequantizeLinear output."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = const_array(dq.inputs[1])
    zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), np.uint8)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    if zp.dtype == np.int8:
        qmin = -128
    elif zp.dtype == np.uint8:
        qmin = 0
    else:
        return None
    return float(scale.reshape(())), int(zp.reshape(())), qmin
