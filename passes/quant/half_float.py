"""half_float: what stays in float after quantization runs in FP16, inputs and outputs included.

Kind: approximate. TensorRT runs the layers a Q/DQ graph leaves in float in the graph's float type,
so an FP16 graph (ModelOpt's "high-precision dtype fp16") halves their memory traffic. Every FLOAT
tensor becomes FLOAT16: initializers and constants are rounded to FP16 (relative error ≤ 2⁻¹¹) and
clipped to its range ±65504 where that changes nothing (an attention mask's −3.4e38 becomes −65504,
not −inf, so 0·mask stays 0; any other constant or calibrated tensor past ±65504 is an error, and so
is a graph whose nonlinear ops full-int8 replaced by integer arithmetic),
Q/DQ scales too (at least FP16's smallest subnormal, so none rounds to 0), Casts to FLOAT cast to
FLOAT16, and graph inputs and outputs are FP16. A scale below FP16's normal range (6.1e-5, a channel
of tiny weights) keeps fewer significant bits; the log says how many did. Inputs that ONNX types as float32 only (Resize's roi
and scales, NonMaxSuppression's boxes and scores) are cast back to FLOAT in front of them. The
error this adds is that of running each float op in FP16: `onnxq compare` measures it.

Run it last: after `quantize` (it needs the scales) and after any pass that reads float weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import Namer, is_const
from onnxq.ir.modelio import to_proto_without_weights
from onnxq.metadata import REPLACEMENT_KEY
from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext, after_quantize
from onnxq.quant.calibrate import collect_statistics
from onnxq.quant.qdq import mask_tainted

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
HALF_MAX = float(np.finfo(np.float16).max)
HALF_TINY = float(np.finfo(np.float16).smallest_subnormal)
HALF_NORMAL = float(np.finfo(np.float16).tiny)  # below it FP16 keeps fewer than 11 significant bits
# (op, input index) that ONNX types as float32 whatever the data's type
FLOAT32_ONLY = {("Resize", 1), ("Resize", 2), ("Upsample", 1), ("NonMaxSuppression", 0), ("NonMaxSuppression", 1),
                ("NonMaxSuppression", 3), ("NonMaxSuppression", 4)}
_SCALE_INPUT = {"QuantizeLinear": 1, "DequantizeLinear": 1}


@dataclass(frozen=True)
class HalfFloat(GraphPass):
    name: ClassVar[str] = "half_float"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    def requires(self, model: ir.Model) -> None:
        after_quantize(self, model)
        replaced = [n.name for n in model.graph if REPLACEMENT_KEY in n.metadata_props]
        if replaced:
            raise PassConditionError(f"half_float: {len(replaced)} nodes (e.g. '{replaced[0]}') compute a nonlinear op as "
                                     "exact integer arithmetic in float32 (the full-int8 replacements), which FP16 "
                                     "cannot hold: keep --high-precision fp32 with this recipe")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph = model.graph
        masks = _mask_values(graph)
        _check_ranges(model, masks, ctx)
        scales = {n.inputs[i] for n in graph if n.op_type in _SCALE_INPUT for i in (_SCALE_INPUT[n.op_type],)}
        clipped = sum(_halve_initializer(v, floor=HALF_TINY if v in scales else 0.0, is_mask=_is_mask(v, masks))
                      for v in graph.initializers.values() if v.dtype == FLOAT and not _float32_only(v))
        for node in graph:
            _halve_attributes(node, masks)
            for value in node.outputs:
                if value.dtype == FLOAT:
                    value.dtype = HALF
        for value in graph.inputs:
            if value.dtype == FLOAT:
                value.dtype = HALF
        kept = _cast_back_float32_inputs(graph)
        _check(model)
        coarse = sum(int(np.count_nonzero(v.const_value.numpy() < HALF_NORMAL)) for v in scales if v.is_initializer()
                     and v.dtype == HALF)
        if coarse:  # an FP16 subnormal keeps fewer significant bits than the scale had
            ctx.log(f"half_float: {coarse} Q/DQ scales are below FP16's normal range ({HALF_NORMAL:.1e}) and lost "
                    "precision: channels with tiny weights; keep --high-precision fp32 if they matter")
        return {"initializers_clipped_to_fp16_range": clipped, "float32_inputs_cast_back": kept,
                "subnormal_scales": coarse}


def _float32_only(value: ir.Value) -> bool:
    """A constant read only where ONNX wants float32 (Resize's scales): left as it is."""
    uses = list(value.uses())
    return bool(uses) and all((node.op_type, index) in FLOAT32_ONLY for node, index in uses)


def _mask_values(graph: ir.Graph) -> set[ir.Value]:
    """Tensors carrying an attention mask's huge constant into a Softmax: the ones where clipping to
    ±65504 changes nothing (exp of −65504 is 0 as exp of −3.4e38 is). A huge constant that reaches
    anything else (a scale of 1e5 into a Conv) is data, and FP16 must hold it."""
    tainted = mask_tainted(graph)
    found: set[ir.Value] = set()
    for value in tainted:
        frontier, seen = [value], set()
        while frontier:
            current = frontier.pop()
            seen.add(current)
            for user in current.consumers():
                if user.op_type == "Softmax":
                    found.add(value)
                frontier += [v for v in user.outputs if v in tainted and v not in seen]
    return found


def _is_mask(value: ir.Value, masks: set[ir.Value]) -> bool:
    """A mask tensor, or a constant that one op turns into a mask (e.g. the −inf of a Where)."""
    return value in masks or any(out in masks for user in value.consumers() for out in user.outputs)


def _to_half(array: np.ndarray, what: str, is_mask: bool) -> tuple[np.ndarray, int]:
    """(array clipped to ±65504 as FP16, how many entries were clipped); past that range only a mask's
    constant may be clipped (to a large finite value: still masks), data would be wrong in FP16."""
    clipped = int(np.count_nonzero(np.abs(array) > HALF_MAX))
    if clipped and not is_mask:
        raise OnnxqError(f"half_float: {what} holds values up to {np.abs(array).max():.3g}, past FP16's ±65504, "
                         "and is not an attention mask: keep --high-precision fp32 for this model")
    return np.clip(array, -HALF_MAX, HALF_MAX).astype(np.float16), clipped


def _check_ranges(model: ir.Model, masks: set[ir.Value], ctx: PassContext) -> None:
    """Refuse when a float tensor's calibrated range passes FP16's ±65504 (it would become inf there);
    mask tensors excepted."""
    names = [v.name for node in model.graph for v in node.outputs
             if v.dtype == FLOAT and v not in masks and not is_const(v)]
    ranges = collect_statistics(model, names, ctx.require_calibration("half_float"), histograms=False,
                                show_progress=ctx.show_progress).ranges("max")
    over = sorted(((r.amax, name) for name, r in ranges.items() if r.finite and r.amax > HALF_MAX), reverse=True)
    if over:
        raise OnnxqError(f"half_float: {len(over)} float tensors pass FP16's range ±65504 on the calibration data "
                         f"(largest: '{over[0][1]}', |x| up to {over[0][0]:.3g}), so they would be inf in FP16: "
                         "keep --high-precision fp32 for this model")


def _halve_initializer(value: ir.Value, floor: float, is_mask: bool) -> int:
    """Round one FLOAT initializer to FP16 in place; returns how many entries were clipped to ±65504
    (a mask's; a data constant that large is an error: FP16 cannot hold it)."""
    half, clipped = _to_half(value.const_value.numpy(), f"constant '{value.name}'", is_mask)
    if floor:  # a scale: positive, and never 0 in FP16
        half = np.maximum(half, np.float16(floor))
    value.const_value = ir.tensor(half, name=value.name)
    value.dtype = HALF
    return clipped


def _halve_attributes(node: ir.Node, masks: set[ir.Value]) -> None:
    """Casts to FLOAT and float constants in attributes (Constant, ConstantOfShape) become FP16; a
    constant past ±65504 only when it is a mask's."""
    if node.op_type in ("Cast", "CastLike") and node.attributes.get("to") is not None \
            and node.attributes["to"].value == FLOAT.value:
        node.attributes["to"] = ir.AttrInt64("to", HALF.value)
    for key in ("value",):
        attribute = node.attributes.get(key)
        if attribute is not None and attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == FLOAT:
            array, _ = _to_half(attribute.value.numpy(), f"the constant made by node '{node.name}'",
                                any(_is_mask(v, masks) for v in node.outputs))
            node.attributes[key] = ir.AttrTensor(key, ir.tensor(array))


def _cast_back_float32_inputs(graph: ir.Graph) -> int:
    namer, count = Namer(graph), 0
    for node in list(graph):
        for index, value in enumerate(node.inputs):
            if (node.op_type, index) in FLOAT32_ONLY and value is not None and value.dtype == HALF:
                cast = ir.node("Cast", [value], {"to": FLOAT.value}, name=namer.fresh(f"{node.name}_input{index}_Cast"))
                cast.outputs[0].name = namer.fresh(f"{value.name}_float32")
                cast.outputs[0].dtype, cast.outputs[0].shape = FLOAT, value.shape
                graph.insert_before(node, cast)
                node.replace_input_with(index, cast.outputs[0])
                count += 1
    return count


def _check(model: ir.Model) -> None:
    """ONNX's type checker over the whole converted graph: an op that takes no FP16 is named."""
    try:
        proto, _ = to_proto_without_weights(model)  # types and dims only: the weights are not copied
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # the checker raises several types; the first line names the node
        raise OnnxqError(f"half_float: the FP16 graph is not valid ONNX: {str(exc).splitlines()[0]}") from None
