"""quantize: calibrate activations and insert Q/DQ nodes where the target's rule table says.

Kind: approximate. Each quantized tensor x becomes DQ(Q(x)) = s·clamp(round(x/s) + z) − s·z, so its
error is at most s/2 inside the calibrated range and saturates outside it; `onnxq compare` measures
the effect on the outputs. Weights are stored as integers with a DequantizeLinear (per output
channel by default, per tensor with weights="per-tensor"); biases stay in float. With
rounding="gptq" the integers are chosen against each layer's calibration inputs (onnxq.quant.gptq) at the
same scales, the costliest inputs first (gptq_order); with "adaround" or "flexround" they are learned
block by block against the float block's outputs (onnxq.quant.reconstruct; FlexRound also learns the
step). Either way the format is unchanged.
With format="fp8" (TensorRT only) weights and activations are FP8 E4M3 instead, scaled so the
calibrated range maps to ±448: DQ(Q(x)) = s·fp8(clip(x/s, −448, 448)) (opset 21), whose error is relative (at most
1/16 of |x| above s·2⁻⁶, s·2⁻¹⁰ below) rather than a fixed half-step. Embedding tables (a constant read by Gathers) stay float unless embeddings="int8", which stores them
INT8 with one scale per row: each looked-up value is then within half its row's step of the float one.
With head_bits=8 the output layer (a linear layer writing a model output: an LM head, a classifier) keeps
8-bit weights (per channel, or per tensor with weights="per-tensor") under weight_bits=4; a width that
allocate_bits chose for it wins. INT4 weights in blocks take weight_calibrator="mse" per block, each
block's squared error weighted by Σx² of its input where GPTQ has gathered it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxq.analysis.moe import expert_gates
from onnxq.errors import OnnxqError
from onnxq.ir.graph import Namer, const_array, is_const, opset_version
from onnxq.metadata import FLOAT_REASON_KEY, KEEP_FLOAT_KEY, QUANTIZED_KEY, RANGE_MARGIN_KEY, WEIGHT_BITS_KEY
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext, has_qdq
from onnxq.progress import progress
from onnxq.quant import gptq
from onnxq.quant.bias_correction import correct_biases, correctable
from onnxq.quant.bias_range import detach_overflowing_biases
from onnxq.quant.bit_allocation import weight_format
from onnxq.quant.calibrate import Range, collect_statistics
from onnxq.quant.calibrator_choice import AUTO_CANDIDATES, FP8_CANDIDATES, choose_calibrator, reference_outputs
from onnxq.quant.qdq import (
    FP8,
    INT4_WEIGHT,
    INT8_WEIGHT,
    UINT8,
    Planner,
    activation_format,
    activation_params,
    insert_activation_qdq,
    insert_weight_dq,
    quantize_weight,
    tag,
)
from onnxq.quant.selection import outside_op_types, select_nodes
from onnxq.quant.targets import get_target
from onnxq.quant.weight_rounding import WeightJob, round_weights


@dataclass(frozen=True)
class Quantize(GraphPass):
    name: ClassVar[str] = "quantize"
    kind: ClassVar[Kind] = Kind.APPROXIMATE

    calibrator: Literal["max", "percentile", "entropy", "mse", "auto"] = "percentile"
    percentile: float = option(99.99, low=50.0, high=100.0)
    weights: Literal["per-channel", "per-tensor"] = "per-channel"
    weight_calibrator: Literal["max", "mse", "auto"] = "mse"  # auto: max per channel or block, mse per tensor
    weight_bits: Literal[4, 8] = 8
    # the output layer's weights (a linear layer writing a model output: an LM head, a classifier) at this
    # width; 0: weight_bits. Its error reaches the outputs unattenuated, and an LM head is a fifth of a small LM
    head_bits: Literal[0, 4, 8] = 0
    activation_bits: Literal[4, 8] = 8
    block_size: int = option(0, low=0)
    bins: int = option(2048, low=16)
    exclude: list[str] = option([])  # node names or regular expressions kept in float
    op_types: list[str] = option([])  # quantize only nodes of these op types (empty: every op type)
    # "warn": a pattern whose nodes earlier passes removed (a folded BatchNorm) is skipped with a warning;
    # onnxq.quantize sets it for --exclude, having checked every pattern against the input model
    exclude_missing: Literal["error", "warn"] = "error"
    unknown_ops: Literal["error", "float"] = "error"
    bias_correction: bool = True
    # gptq: integers chosen for each layer's output error; adaround/flexround: learned per block (needs torch)
    rounding: Literal["nearest", "gptq", "adaround", "flexround"] = "nearest"
    learn_iterations: int = option(1000, low=1)  # optimisation steps per block for adaround/flexround
    learn_regulariser: float = option(1000.0, above=0.0)  # AdaRound's λ: how hard h is pushed to 0 or 1
    gptq_dampings: tuple[float, ...] = option(gptq.DAMPINGS, above=0.0)  # tried per layer on held-out batches
    # activation: inputs rounded from the largest Σx² down (act-order); natural: in index order
    gptq_order: Literal["activation", "natural"] = "activation"
    # AGQ (mixture-of-experts models): each expert's GPTQ Hessian sums its tokens weighted by their gate, so
    # tokens routed elsewhere (which the dense form still runs through it) do not count
    agq: bool = False
    float_residual: bool = False  # keep Adds of two activations (the residual stream) in float
    # embedding tables (Gather on a constant): int8 stores them with one scale per row, whatever the weight format
    embeddings: Literal["float", "int8"] = "float"
    # the target's activation type, or int8/uint8 where the target takes both (ort-cpu; TensorRT: int8 only)
    activation_type: Literal["target", "int8", "uint8"] = "target"
    # uint8: 8-bit weights stored as q + 128 with zero point 128 (ORT's U8U8 kernels; the same dequantized
    # values as int8), for --target ort-cpu only; TensorRT takes signed weights
    weight_type: Literal["int8", "uint8"] = "int8"
    # int8: integer Q/DQ; fp8: FP8 E4M3 weights and activations (TensorRT on Hopper/Ada; opset 21)
    format: Literal["int8", "fp8"] = "int8"

    def __post_init__(self):
        if self.format == "fp8" and (self.weight_bits, self.activation_bits, self.block_size) != (8, 8, 0):
            raise ValueError("format fp8 is 8-bit, per tensor or per channel: weight_bits and activation_bits 8, "
                             "block_size 0")
        if self.weight_type == "uint8" and (self.weight_bits != 8 or self.format != "int8"):
            raise ValueError("weight_type uint8 is for 8-bit integer weights (weight_bits 8, format int8)")
        if self.format == "fp8" and self.calibrator in ("entropy", "mse"):
            raise ValueError(f"calibrator '{self.calibrator}' chooses its clip for the uniform INT8 grid; with format "
                             "fp8 use max, percentile or auto (auto measures each candidate in FP8)")
        if self.format == "fp8" and self.rounding in ("adaround", "flexround"):
            raise ValueError(f"rounding '{self.rounding}' learns integer weights; with format fp8 use nearest or gptq")
        if not isinstance(self.gptq_dampings, tuple):  # frozen: a list given in Python becomes a tuple
            object.__setattr__(self, "gptq_dampings", tuple(self.gptq_dampings))
        if not self.gptq_dampings:
            raise ValueError("gptq_dampings needs at least one value")
        if self.head_bits and self.format == "fp8":
            raise ValueError("head_bits chooses an integer grid for the output layer; with format fp8 every weight is FP8")
        if self.head_bits == 4 and self.weight_type == "uint8":
            raise ValueError("weight_type uint8 is for 8-bit weights: head_bits 4 would store the head in 4 bits")
        if self.agq and self.rounding != "gptq":
            raise ValueError("agq weights GPTQ's statistics by the experts' gates: it needs rounding gptq (the "
                             "transformer recipes use it)")

    def requires(self, model: ir.Model) -> None:
        allocated = {int(n.metadata_props[WEIGHT_BITS_KEY]) for n in model.graph if WEIGHT_BITS_KEY in n.metadata_props}
        if allocated and (self.format == "fp8" or self.weight_type == "uint8"):
            raise PassConditionError("quantize: allocate_bits' mixed widths are integer grids: they do not combine "
                                     "with format fp8 or weight_type uint8")
        narrow = 4 in (self.weight_bits, self.activation_bits, self.head_bits) or self.block_size or min(allocated, default=8) <= 4
        needed = 21 if narrow or self.format == "fp8" else 13
        if opset_version(model) < needed:
            raise PassConditionError(f"quantize needs opset >= {needed} (model has {opset_version(model)}): "
                                     "put upgrade_opset before quantize in the recipe")
        if has_qdq(model):
            raise PassConditionError("quantize: the model is quantized already (one quantize step per recipe)")

    def ensures(self, model: ir.Model) -> None:
        if not has_qdq(model):
            raise PassConditionError("quantize inserted no Q/DQ node: every op was excluded or has no rule that "
                                     "quantizes it, so the output would be the float model")

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        target = get_target(ctx.target)
        if self.format == "fp8" and target.name != "tensorrt":
            raise PassConditionError(f"quantize: format fp8 is for --target tensorrt (target {target.name} has no "
                                     "FP8 kernels)")
        signed = self._signed_activations(target)
        if self.weight_type == "uint8" and target.symmetric:
            raise PassConditionError(f"quantize: target {target.name} takes signed weights only, not uint8")
        data = ctx.require_calibration(self.name)
        # before the target's preparation and any Q/DQ put nodes between a layer and an output
        heads = _output_layers(model.graph) if self.head_bits else set()
        if self.head_bits:
            ctx.log(f"quantize: head_bits {self.head_bits}: " + (", ".join(sorted(n.name or n.op_type for n in heads))
                                                                  or "no linear layer writes a model output"))
        prepared = target.prepare(model, signed) if target.prepare else {}
        plan = self._plan(model, target)
        # before any Q/DQ: the experts and their gates are recognised on the float graph
        affinities = expert_gates(model) if self.agq else {}
        wanted = {plan.range_of.get(v, v).name for v in plan.activations}
        # the auto calibrator's float reference is an output of the model state the ranges are read from
        reference = reference_outputs(model) if self.calibrator == "auto" else None
        stats = collect_statistics(model, sorted(wanted), data, histograms=self.calibrator != "max", bins=self.bins,
                                   show_progress=ctx.show_progress, alongside=[reference] if reference else [])
        act_fmt = activation_format(self.activation_bits, signed, self.format)
        calibrator, choice = self.calibrator, {}
        if calibrator == "auto":
            def trial(copy: ir.Model, ranges: dict[str, Range]) -> None:
                self._insert_activations(copy, self._plan(copy, target, trial=True), ranges, act_fmt, target.symmetric)

            calibrator, ranges, errors = choose_calibrator(model, stats, trial, data, symmetric=target.symmetric,
                                                           percentile=self.percentile, show_progress=ctx.show_progress,
                                                           reference=reference,
                                                           candidates=FP8_CANDIDATES if self.format == "fp8" else AUTO_CANDIDATES)
            choice = {"calibrator_chosen": calibrator,
                      "calibrator_output_error": {k: float(f"{v:.3e}") for k, v in errors.items()}}
            ctx.log(f"quantize: calibrator auto -> {calibrator} (relative output error, activations only: "
                    + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + ")")
        else:
            ranges = stats.ranges(calibrator, symmetric=target.symmetric, percentile=self.percentile)
        notes = self._insert_activations(model, plan, ranges, act_fmt, target.symmetric)
        graph, namer = model.graph, Namer(model.graph)

        tables = _quantize_tables(graph, namer, plan, notes)
        # only the layers bias correction can correct keep their float weight (holding every weight, a
        # transformer's MatMuls included, would keep a float copy of the model to the end)
        float_weights = {node.name: const_array(weight) for (weight, _), slots in plan.weights.items()
                         for node, index in slots if index == 1 and correctable(node)} if self.bias_correction else {}
        fmt = FP8 if self.format == "fp8" else INT4_WEIGHT if self.weight_bits == 4 else INT8_WEIGHT
        # allocate_bits' widths, where it ran; the step's own format elsewhere
        head_fmt = weight_format(self.head_bits) if self.head_bits else fmt
        fmt_of = {weight.name: _allocated_format(slots, head_fmt if any(n in heads for n, _ in slots) else fmt)
                  for (weight, _), slots in plan.weights.items()}
        hessians, gptq_readers = self._gptq_statistics(model, plan, data, ctx, affinities)
        layouts = {weight.name: self._layout(weight, axis, fmt_of[weight.name]) for weight, axis in plan.weights}
        slots_of = {weight.name: (weight, slots) for (weight, _), slots in plan.weights.items()}

        def write(name: str, q, scale) -> None:
            weight, slots = slots_of.pop(name)
            axis, block = layouts[name]
            stored, zero_point = (UINT8, 128) if self.weight_type == "uint8" else (fmt_of[name], 0)
            if zero_point:
                q = (q.astype(np.int16) + zero_point).astype(stored.numpy)
            insert_weight_dq(graph, namer, weight, slots, q, scale, axis, stored, block, zero_point)
            if weight.name not in graph.initializers and not weight.uses():
                weight.const_value = None  # an initializer's float array goes now, not when the pass returns (plan holds the value)
            granularity = (f"blocks of {block}" if block else
                           f"per-channel axis {axis}" if axis is not None else "per-tensor")
            if stored is not fmt and stored is not UINT8:
                granularity += f", {_width(stored)}-bit grid"
            for node, index in slots:
                notes[node].append(f"input {index}: weight {stored.dtype.name.lower()} {granularity}")

        learned = self._learn_rounding(model, plan, layouts, fmt_of, data, write, ctx)
        # a Hessian is popped as its weight is handed out: a matrix is freed once its last reader is rounded
        jobs = (WeightJob(name, const_array(weight), *layouts[name], hessians.pop(name) if name in hessians else None,
                          gptq_readers.get(name, [None])[0], fmt_of[name]) for name, (weight, _) in list(slots_of.items()))
        gptq_rounded = 0
        stage = "quantize: GPTQ" if hessians else f"quantize: weights ({self.weight_calibrator} scales)"
        rounded = round_weights(jobs, fmt, self.weight_calibrator, self.gptq_dampings, order=self.gptq_order)
        for job, q, scale in progress(rounded, desc=stage, total=len(slots_of), unit="layer",
                                      disable=not ctx.show_progress):
            write(job.name, q, scale)
            gptq_rounded += job.hessian is not None

        for value, reason in plan.skipped.items():
            for node, index in value.uses():
                notes[node].append(f"input {index} kept float: {reason}")
        for node, lines in notes.items():
            tag(node, QUANTIZED_KEY, "; ".join(lines))
        for node, reason in plan.float_reasons.items():
            if node not in notes:
                tag(node, FLOAT_REASON_KEY, reason)
        graph.sort()
        # before bias correction runs the model (a wrapped int32 bias would be "corrected" for), and again
        # after it, on the final biases
        widened, moved = _fit_biases(graph, target)
        corrected = correct_biases(model, float_weights, data, show_progress=ctx.show_progress) if self.bias_correction else 0
        widened_after, moved_after = _fit_biases(graph, target)
        widened, moved = widened + widened_after, moved + moved_after
        return {"biases_corrected": corrected, **({"biases_moved_to_add": len(moved)} if moved else {}),
                **({"weight_scales_widened_for_bias": len(widened)} if widened else {}),
                "activations_quantized": sum(v not in plan.skipped for v in plan.activations),
                "weights_quantized": len(plan.weights), "kept_float": len(plan.float_reasons),
                "skipped": len(plan.skipped), "gptq_rounded": gptq_rounded,
                **({"idle_qdq_dropped": plan.idle_dropped} if plan.idle_dropped else {}),
                **({"embedding_tables_quantized": tables} if self.embeddings == "int8" else {}),
                **prepared, **learned, **choice}

    def _signed_activations(self, target) -> bool:
        """Whether activations are stored signed: the target's type unless the step names one it takes."""
        native = target.activation_format.qmin < 0
        if self.activation_type == "target":
            return native
        if target.symmetric and self.activation_type != ("int8" if native else "uint8"):
            raise PassConditionError(f"quantize: target {target.name} takes {'int8' if native else 'uint8'} "
                                     f"activations only, not {self.activation_type}")
        return self.activation_type == "int8"

    def _plan(self, model: ir.Model, target, *, trial: bool = False) -> Planner:
        """Which tensors get Q/DQ, by the target's rule table; residual Adds float if asked (`trial`: the
        plan of a calibrator trial's copy, which warns about nothing)."""
        residual = [n for n in model.graph if self.float_residual and n.op_type == "Add"
                    and len(n.inputs) == 2 and all(v is not None and not is_const(v) for v in n.inputs)]

        def skip(message: str) -> None:
            if not trial:
                logging.getLogger("onnxq").warning(f"{message} after the earlier passes (they removed or replaced "
                                                   "the nodes it named); skipped")

        on_missing = skip if self.exclude_missing == "warn" else None
        tagged = [n for n in model.graph if KEEP_FLOAT_KEY in n.metadata_props]  # asked for by an earlier pass
        excluded = [*select_nodes(model.graph, self.exclude, "quantize: exclude", on_missing=on_missing),
                    *outside_op_types(model.graph, self.op_types), *(n.name for n in residual), *(n.name for n in tagged)]
        plan = Planner(model.graph, target.table, exclude=excluded,
                       unknown_ops=self.unknown_ops, target=target.name,
                       quantize_tables=self.embeddings == "int8").run()
        for node in residual:  # transformers: one token's massive activations rule out a per-tensor scale
            plan.float_reasons[node] = "residual-stream Add kept in float (float_residual): its range is set by outlier tokens"
        for node in tagged:
            plan.float_reasons[node] = node.metadata_props[KEEP_FLOAT_KEY]
        if target.settle_plan is not None:
            plan.idle_dropped = target.settle_plan(plan)
        return plan

    @staticmethod
    def _insert_activations(model: ir.Model, plan, ranges: dict[str, Range], act_fmt,
                            symmetric: bool) -> dict[ir.Node, list[str]]:
        """Q/DQ on every planned activation with a usable range; the notes for each reader. A margin a
        pass asked for widens the range before a scale group shares it, so the group keeps one scale."""
        ranges, widened = dict(ranges), set()
        for value in plan.activations:
            margin, name = _range_margin(value), plan.range_of.get(value, value).name
            if margin != 1.0 and name in ranges and ranges[name].finite and name not in widened:
                ranges[name] = Range(ranges[name].lo * margin, ranges[name].hi * margin)
                widened.add(name)
        ranges = _share_group_ranges(ranges, plan.scale_groups)
        graph, namer = model.graph, Namer(model.graph)
        notes: dict[ir.Node, list[str]] = defaultdict(list)
        for value, slots in plan.activations.items():
            r = ranges.get(plan.range_of.get(value, value).name)
            if r is None or not r.finite or r.amax > 1e30:
                plan.skipped[value] = f"calibrated range {r} is not usable: kept in float"
                continue
            scale, zero_point = activation_params(r.lo, r.hi, act_fmt, symmetric)
            insert_activation_qdq(graph, namer, value, slots, scale, zero_point, act_fmt)
            for node, index in slots:
                notes[node].append(f"input {index}: {act_fmt.dtype.name.lower()} per-tensor")
        return notes

    def _layout(self, weight: ir.Value, axis: int | None, fmt) -> tuple[int | None, int]:
        """(axis, block size) of a weight's scales: blocks apply to 2-D (MatMul/Gemm) weights stored in 4 bits
        or fewer; conv kernels, and wider weights of a mixed-precision plan, stay per channel (ONNX Runtime
        fuses an INT8 weight's DequantizeLinear into its integer MatMul, which takes per-column scales only)."""
        rank = len(weight.shape) if weight.shape is not None else const_array(weight).ndim
        narrow = fmt.dtype == INT4_WEIGHT.dtype
        block = self.block_size if rank == 2 and axis is not None and narrow else 0
        return (axis if self.weights == "per-channel" or block else None), block

    def _learn_rounding(self, model: ir.Model, plan, layouts, fmt_of, data, write, ctx: PassContext) -> dict:
        """adaround/flexround: learn and write the weights of every block (onnxq.quant.reconstruct), each
        on its own grid (`fmt_of`: mixed widths, a wider head); the weights it leaves are rounded to
        nearest by the caller."""
        if self.rounding not in ("adaround", "flexround"):
            return {}
        if importlib.util.find_spec("torch") is None:
            raise OnnxqError(f"rounding '{self.rounding}' learns with torch: pip install 'onnxq[torch]'")
        from onnxq.quant.reconstruct.engine import learn_model_rounding
        from onnxq.quant.reconstruct.points import WeightPoint, output_axis
        from onnxq.quant.reconstruct.rounding import LearnConfig

        points = {}
        for (weight, _), slots in progress(list(plan.weights.items()), desc=f"quantize: {self.rounding} weight scales",
                                           unit="layer", disable=not ctx.show_progress):
            axis, block = layouts[weight.name]
            fmt = fmt_of[weight.name]
            _, scale = quantize_weight(const_array(weight), axis, fmt, self.weight_calibrator, block)
            points[weight.name] = WeightPoint(scale, axis, fmt, output_axis(*slots[0]), block)
        model.graph.sort()
        config = LearnConfig(method=self.rounding, iterations=self.learn_iterations, reg_weight=self.learn_regulariser)
        summary = learn_model_rounding(model, points, data, config, write, show_progress=ctx.show_progress,
                                       log=ctx.log)
        ctx.log(f"quantize: {self.rounding} learned {summary['learned_weights']} weights in "
                f"{summary['learned_blocks']} blocks (block output error {summary['block_mse_nearest']:.3e} "
                f"-> {summary['block_mse_learned']:.3e})")
        return summary

    def _gptq_statistics(self, model: ir.Model, plan, data, ctx: PassContext,
                         affinities: dict[str, str]) -> tuple[dict, dict]:
        """GPTQ's H per weight name, over the inputs as quantized so far (weights still float); only for
        weights whose every reader GPTQ supports; expert layers weighted by their gates (`affinities`, AGQ).
        Empty unless rounding is gptq."""
        if self.rounding != "gptq":
            return {}, {}
        if importlib.util.find_spec("torch") is None:  # torch is optional; the recipe still runs
            ctx.log("quantize: GPTQ rounding needs torch (pip install 'onnxq[torch]'): weights rounded to nearest")
            return {}, {}
        readers = {weight.name: [node for node, _ in slots] for (weight, _), slots in plan.weights.items()
                   if all(index == 1 and gptq.supported(node) for node, index in slots)}
        model.graph.sort()
        if self.agq:
            if not affinities:
                raise PassConditionError("quantize: agq found no mixture-of-experts layer (router → top-k → "
                                         "gated experts) in the model")
            ctx.log(f"quantize: AGQ weights the statistics of {len(affinities)} expert layers by their gates")
        return gptq.collect_hessians(model, readers, data, show_progress=ctx.show_progress,
                                     affinities=affinities), readers


# ops between an output layer and the model output that leave it the output layer (a bias Add on a constant,
# reshapes, a final softmax)
_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Softmax", "LogSoftmax", "Add")


def _output_layers(graph: ir.Graph) -> set[ir.Node]:
    """The linear layers whose output is a model output (an LM head, a classifier), directly or through
    _PASS_THROUGH ops."""
    heads = set()
    for value in graph.outputs:
        node = value.producer()
        while node is not None and node.op_type in _PASS_THROUGH:
            node = _carried_from(node)
        if node is not None and node.op_type in ("MatMul", "Gemm", "Conv"):
            heads.add(node)
    return heads


def _carried_from(node: ir.Node) -> ir.Node | None:
    """The producer of the activation a pass-through op carries; None after an Add of two activations
    (a residual sum: no single layer before it is the output layer)."""
    if node.op_type == "Add":
        activations = [v for v in node.inputs if not is_const(v)]
        return activations[0].producer() if len(activations) == 1 else None
    return node.inputs[0].producer()


def _allocated_format(slots, default):
    """The format allocate_bits chose for a weight (the widest its readers were given), or `default`."""
    widths = [int(node.metadata_props[WEIGHT_BITS_KEY]) for node, _ in slots if WEIGHT_BITS_KEY in node.metadata_props]
    return weight_format(max(widths)) if widths else default


def _width(fmt) -> int:
    return int(fmt.qmax).bit_length() + 1


def _quantize_tables(graph: ir.Graph, namer: Namer, plan, notes) -> int:
    """Embedding tables to INT8 with one max-abs scale per row (symmetric, zero point 0), read through a
    DequantizeLinear (axis 0): a gathered value is off by at most half its row's step, max|row|/254."""
    for table, slots in plan.tables.items():
        q, scale = quantize_weight(const_array(table), 0, INT8_WEIGHT, "max")
        insert_weight_dq(graph, namer, table, slots, q, scale, 0, INT8_WEIGHT)
        for node, index in slots:
            notes[node].append(f"input {index}: embedding table int8 per-row (axis 0)")
    return len(plan.tables)


def _range_margin(value: ir.Value) -> float:
    """Headroom a pass asked for on its output (node metadata `onnxq.range_margin`), 1 otherwise.

    split_range tags the sparse outlier part of a split input: calibration sees few of its values,
    so evaluation data exceeds the calibrated max there, and a coarser step costs little on a
    tensor that is zero almost everywhere (zero stays exact)."""
    node = value.producer()
    text = node.metadata_props.get(RANGE_MARGIN_KEY) if node is not None else None
    return float(text) if text else 1.0


def _share_group_ranges(ranges: dict[str, Range], groups: list[set[ir.Value]]) -> dict[str, Range]:
    """Give every calibrated member of a scale group the union of the members' ranges."""
    ranges = dict(ranges)
    for group in groups:
        members = [v.name for v in group if v.name in ranges and ranges[v.name].finite]
        if len(members) < 2:
            continue
        union = Range(min(ranges[m].lo for m in members), max(ranges[m].hi for m in members))
        for m in members:
            ranges[m] = union
    return ranges


def _fit_biases(graph: ir.Graph, target) -> tuple[list[str], list[str]]:
    """Biases ONNX Runtime would wrap past int32: fitted the target's way where it has one (ort-cpu widens
    the weight steps, so ORT still fuses the layer), the rest moved to an Add after their layer."""
    widened = target.fit_biases(graph) if target.fit_biases else []
    return widened, detach_overflowing_biases(graph)
