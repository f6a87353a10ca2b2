"""The Python API: `onnxq.quantize(model, calibration_data, ...)`."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.arguments import check_quantize_arguments
from onnxq.errors import OnnxqError, OnnxqValueError
from onnxq.ir.modelio import load_model, save_model
from onnxq.metadata import RECIPE_REASON_KEY
from onnxq.pipeline import PassContext, load_recipe, run_pipeline
from onnxq.pipeline.choice import choose_recipe
from onnxq.pipeline.recipes import with_options
from onnxq.pipeline.registry import pass_class
from onnxq.quant.qdq import Planner
from onnxq.quant.scheme import QuantScheme
from onnxq.quant.selection import outside_op_types, select_nodes
from onnxq.quant.targets import get_target
from onnxq.stats.calib_data import CalibrationSet, load_calibration, model_inputs
from onnxq.stats.calib_shapes import batch_size_of, check_batches, parse_shapes, shapes_from_mapping
from onnxq.torch_export import export

# warnings (an exclusion that selects nothing) and debug detail; `log` carries the progress lines.
# With no logging set up, Python prints warnings to stderr; the CLI sets the level (--log-level).
logger = logging.getLogger("onnxq")


def quantize(model: str | os.PathLike | onnx.ModelProto | ir.Model, calibration_data: Any, *,
             output: str | os.PathLike | None = None, recipe: str | os.PathLike | list | None = None,
             target: str = "tensorrt", per_tensor: bool | None = None, calibrator: str | None = None,
             rounding: str | None = None, activation_type: str | None = None, format: str | None = None,
             high_precision: str = "fp32", weight_type: str | None = None, bits_budget: float | None = None,
             bit_allocation: str = "luq", bits_cache: str | os.PathLike | None = None, agq: bool = False, exclude: Sequence[str] | None = None, op_types: Sequence[str] | None = None,
             batch_size: int = 1, calibration_shapes: str | dict | None = None, max_samples: int | None = None, padding_mask: str | None = "auto",
             allow_unknown_ops: bool = False, verify_exact: bool = True, show_progress: bool = True,
             log=print, example_inputs: Any = None) -> onnx.ModelProto:
    """Quantize `model` with `calibration_data` and return the QDQ model (written to `output` if given).

    Args:
        model: path to an .onnx file, an onnx.ModelProto or an onnx_ir Model (left unmodified), or a
            torch.nn.Module, exported first with onnxq.export on `example_inputs`.
        calibration_data: .npz/.npy file or folder, dict of stacked arrays, or iterable of feeds
            (see onnxq.stats.calib_data).
        recipe: built-in recipe name, YAML/JSON file, or list of steps; None picks the best built-in
            recipe for the model.
        target: "tensorrt" (symmetric INT8 for TensorRT) or "ort-cpu" (ONNX Runtime int8 kernels).
        per_tensor / calibrator / rounding: override the recipe's quantize step (weights per tensor;
            activation calibrator max | percentile | entropy | mse; weight rounding nearest | gptq | adaround | flexround).
        activation_type: "int8" or "uint8" activations where the target takes both (ort-cpu; its default
            is uint8); None: the target's own (TensorRT: int8 only).
        format: "int8" or "fp8" (FP8 E4M3 weights and activations, TensorRT only, opset 21; weights
            scaled by their max, activations calibrated with max unless `calibrator` is percentile or auto;
            entropy and mse are refused);
            None: the recipe's (int8 in every built-in recipe).
        weight_type: "int8" (default) or "uint8" weights (stored q + 128, zero point 128: ONNX Runtime's U8U8
            kernels), --target ort-cpu only.
        high_precision: "fp32", or "fp16" to run what stays in float, and the model's inputs and
            outputs, in FP16 (the half_float pass, appended to the recipe; TensorRT only).
        bits_budget: mixed-precision weights: each MatMul/Gemm gets 2, 3, 4, 6 or 8 bits so that the average
            (weighted by weights) stays within this many bits (the allocate_bits pass, inserted before quantize;
            opset 21). bit_allocation: "luq" (lower-entropy outputs get fewer bits), "sensitivity" (measured
            output error per layer and width) or "uniform". bits_cache: a JSON file holding the measured
            sensitivities, read if it covers the model's layers, written otherwise (several budgets, one measurement).
        agq: mixture-of-experts models: weigh each expert's GPTQ statistics by its router gate (needs GPTQ
            rounding, which the transformer recipes use).
        exclude: node names or regular expressions (matched against whole names) of nodes to keep in
            float, added to the recipe's quantize-step `exclude` (ONNX Runtime's nodes_to_exclude). A
            pattern that matches no node of the model is a warning (logger "onnxq") and is ignored.
        op_types: quantize only nodes of these op types, e.g. ["Conv", "MatMul"] (ONNX Runtime's
            op_types_to_quantize); an op type the model lacks is a warning. None: every op type.
        calibration_shapes: the exact shape of every calibration batch, per input: "a:8x3x224x224,b:8x16"
            or {"a": (8, 3, 224, 224)} (ModelOpt's calibration_shapes); the first dimension is the batch
            size. Checked against the model and the data before any work.
        padding_mask: the input whose zeros mark padded positions, left out of every statistic;
            a rank-2 integer or bool input, 1 for real positions; "auto" takes such an input named
            attention_mask; None counts every position.
        example_inputs: a tensor or tuple of tensors for forward, with a torch.nn.Module model only;
            the ONNX inputs take forward's parameter names (the calibration data's keys).

    Raises OnnxqError for unusable input (OnnxqTypeError / OnnxqValueError, also a TypeError /
    ValueError, for an argument of the wrong type or value, named in the message), before any work.
    """
    check_quantize_arguments(model, calibration_data, output=output, recipe=recipe, target=target, per_tensor=per_tensor,
                             calibrator=calibrator, rounding=rounding, activation_type=activation_type,
                             format=format, high_precision=high_precision, weight_type=weight_type,
                             bits_budget=bits_budget, bit_allocation=bit_allocation, bits_cache=bits_cache, agq=agq, calibration_shapes=calibration_shapes, exclude=exclude, op_types=op_types, batch_size=batch_size, max_samples=max_samples,
                             padding_mask=padding_mask, allow_unknown_ops=allow_unknown_ops, verify_exact=verify_exact,
                             show_progress=show_progress, log=log, example_inputs=example_inputs)
    with contextlib.ExitStack() as temporary:
        if example_inputs is not None:  # a torch module: export it to a temporary file, then quantize that
            folder = temporary.enter_context(tempfile.TemporaryDirectory(prefix="onnxq-export-"))
            model = export(model, example_inputs, Path(folder) / "model.onnx", log=log)
        source_path = model if isinstance(model, (str, os.PathLike)) else None
        work = load_model(model)
        if not isinstance(model, (str, os.PathLike)):
            work = ir.from_proto(ir.to_proto(work))  # never edit the caller's object
        data = _calibration(work, calibration_data, calibration_shapes, batch_size=batch_size, max_samples=max_samples,
                            padding_mask=padding_mask, log=log)
        choice = None
        if recipe is None:
            choice = choose_recipe(work, data.first())
            log(f"recipe: {choice.recipe} ({choice.reason}; --recipe chooses another)")
        recipe_name, passes = load_recipe(recipe if choice is None else choice.recipe)
        passes = _with_overrides(work, passes, per_tensor=per_tensor, calibrator=calibrator, rounding=rounding,
                                 activation_type=activation_type, number_format=format, weight_type=weight_type,
                                 agq=agq, allow_unknown_ops=allow_unknown_ops,
                                 exclude=_matching(work, exclude or []),
                                 op_types=_present(work, op_types or []))
        if bits_budget is not None:
            passes = _with_allocation(passes, bits_budget, bit_allocation, bits_cache)
        if high_precision == "fp16" and not any(p.name == "half_float" for p in passes):
            passes = [*passes, pass_class("half_float")()]
        _check_rules_cover(work, passes, target)
        _check_float_type(work, target)
        quantize_step = next((p for p in passes if p.name == "quantize"), None)
        ctx = PassContext(calibration=data, scheme=QuantScheme.of(quantize_step, target), show_progress=show_progress,
                          log=log)
        run_pipeline(work, passes, ctx, verify_exact=verify_exact, recipe_name=recipe_name)
        work.metadata_props[RECIPE_REASON_KEY] = choice.reason if choice is not None else "named by the user"
        proto = ir.to_proto(work)
        if output is not None:
            save_model(work, output, source=source_path)
    return proto


def report(reference: str | os.PathLike | onnx.ModelProto | ir.Model,
           quantized: str | os.PathLike | onnx.ModelProto | ir.Model, data: Any, output: str | os.PathLike, *,
           batch_size: int = 1, max_samples: int | None = None, padding_mask: str | None = "auto",
           show_progress: bool = True) -> dict[str, Any]:
    """Write one self-contained HTML page to `output` showing what quantizing `reference` into `quantized`
    did: recipe, target, passes, per-layer error on `data` (same formats and options as calibration
    data), activation clips and histograms, weight ranges per channel, outlier channels, what stayed
    float and why, lint, nonlinear replacements (docs/report.md). Returns the figures as a dict."""
    from onnxq.analysis.report import write_report

    return write_report(reference, quantized, data, output, batch_size=batch_size, max_samples=max_samples,
                        padding_mask=padding_mask, show_progress=show_progress)


def _calibration(model: ir.Model, source: Any, shapes: str | dict | None, *, batch_size: int,
                 max_samples: int | None, padding_mask: str | None, log) -> CalibrationSet:
    """The calibration set for `model`, in batches of the calibration shapes when given (checked
    against the model first, then every batch against them)."""
    if shapes is not None:
        shapes = parse_shapes(shapes) if isinstance(shapes, str) else shapes_from_mapping(shapes)
        shaped_batch = batch_size_of(shapes, model_inputs(model))
        if batch_size not in (1, shaped_batch):
            raise OnnxqValueError(f"batch_size {batch_size} and the calibration shapes' batch size {shaped_batch} differ")
        batch_size = shaped_batch
    data = load_calibration(source, model, batch_size=batch_size, limit=max_samples, padding_mask=padding_mask)
    if shapes is not None:
        check_batches(data, shapes)
    if data.left_out:
        logger.warning(data.left_out_message("calibration"))
    for name, array in data.first().items():  # all zeros is the usual way a data pipeline fails
        if np.issubdtype(array.dtype, np.floating) and array.size > 1 and np.ptp(array) == 0:
            logger.warning(f"calibration: input '{name}' is {array.flat[0]} everywhere in the first batch; "
                           "ranges calibrated on constant data fit no real input")
    if data.padding_mask:
        log(f"calibration: positions where '{data.padding_mask}' is 0 are padding, left out of the statistics")
    return data


def _matching(model: ir.Model, patterns: Sequence[str]) -> list[str]:
    """The user's exclude patterns that select a node of `model`; each one that selects none is
    warned about (naming the nearest node) and dropped, as ONNX Runtime and ModelOpt ignore them."""
    kept = []
    for pattern in patterns:
        try:
            names = select_nodes(model.graph, [pattern], "exclude")
        except OnnxqError as exc:
            logger.warning(f"{exc}; ignored")
            continue
        logger.debug(f"exclude: '{pattern}' keeps {len(names)} node(s) in float: {', '.join(names)}")
        kept.append(pattern)
    return kept


def _present(model: ir.Model, op_types: Sequence[str]) -> list[str]:
    """`op_types`, with a warning for each op type `model` does not contain."""
    present = {node.op_type for node in model.graph}
    for op in op_types:
        if op not in present:
            logger.warning(f"op_types: the model has no {op} node (its op types: {', '.join(sorted(present))}); "
                           "ignored")
    if op_types:
        logger.debug(f"op_types: only {', '.join(op_types)} quantized; "
                     f"{len(outside_op_types(model.graph, op_types))} node(s) of other types kept in float")
    return list(op_types)


def _with_overrides(model: ir.Model, passes: list, *, per_tensor: bool | None, calibrator: str | None,
                    rounding: str | None, activation_type: str | None, number_format: str | None,
                    weight_type: str | None, agq: bool,
                    allow_unknown_ops: bool, exclude: list[str], op_types: list[str]) -> list:
    """The recipe's passes with the user's overrides applied to its quantize step (a new pass
    object: recipe passes are frozen). Passes that prepare for quantization read the scheme. The
    user's exclude patterns join the recipe's; their op types replace the recipe's."""
    changes: dict[str, Any] = {}
    step = next((p for p in passes if p.name == "quantize"), None)
    if exclude and step is not None:
        # the recipe's patterns must match the input model, as the user's did: then a pattern that
        # selects nothing at the quantize step named nodes an earlier pass removed, only a warning
        select_nodes(model.graph, step.exclude, "quantize: exclude")
        changes["exclude"] = [*step.exclude, *exclude]
        changes["exclude_missing"] = "warn"
    if op_types:
        changes["op_types"] = op_types
    if per_tensor is not None:
        changes["weights"] = "per-tensor" if per_tensor else "per-channel"
    if calibrator:
        changes["calibrator"] = calibrator
    if rounding:
        changes["rounding"] = rounding
    if activation_type:
        changes["activation_type"] = activation_type
    if weight_type:
        changes["weight_type"] = weight_type
    if number_format:
        changes["format"] = number_format
        if number_format == "fp8":  # FP8's steps are relative: clipping outliers rarely pays, in weights or inputs
            changes["weight_calibrator"] = "max"
            changes.setdefault("calibrator", "max")
    passes = [with_options(p, opset=max(p.opset, 21)) if number_format == "fp8" and p.name == "upgrade_opset" else p
              for p in passes]  # FP8 Q/DQ without a zero point need QuantizeLinear's output_dtype (opset 21)
    if agq:  # the quantize step refuses it where the recipe rounds otherwise than with GPTQ
        changes["agq"] = True
    if allow_unknown_ops:
        changes["unknown_ops"] = "float"
    return [with_options(p, **changes) if p.name == "quantize" and changes else p for p in passes]


def _with_allocation(passes: list, budget: float, method: str, cache: str | os.PathLike | None) -> list:
    """allocate_bits before the quantize step, and opset 21 (INT4 weights) where the recipe upgrades to less."""
    if not any(p.name == "quantize" for p in passes):
        raise OnnxqValueError("bits_budget: the recipe has no quantize step to give the widths to")
    passes = [with_options(p, opset=max(p.opset, 21)) if p.name == "upgrade_opset" else p
              for p in passes if p.name != "allocate_bits"]
    if not any(p.name == "upgrade_opset" for p in passes):
        passes.insert(0, pass_class("upgrade_opset")(opset=21))
    at = next(i for i, p in enumerate(passes) if p.name == "quantize")
    return [*passes[:at], pass_class("allocate_bits")(budget=float(budget), method=method,
                                                                 cache=os.fspath(cache) if cache else ""), *passes[at:]]


def _check_float_type(model: ir.Model, target: str) -> None:
    """FP16 models quantize for TensorRT; the ort-cpu placement (UINT8 activations, quantized outputs)
    is not yet right for them, so refuse rather than write a silently wrong model."""
    half = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    if target == "ort-cpu" and any(v.dtype in half for v in [*model.graph.inputs, *model.graph.initializers.values()]):
        raise OnnxqError("FP16/BF16 models quantize for --target tensorrt only; for --target ort-cpu convert the "
                         "model to FP32 first")


def _check_rules_cover(model: ir.Model, passes, target: str) -> None:
    """Fail before any work when the quantize step would meet an op it has no rule for."""
    step = next((p for p in passes if p.name == "quantize"), None)
    if step is None or step.unknown_ops == "float":
        return
    excluded = [*select_nodes(model.graph, step.exclude, "quantize: exclude"),
                *outside_op_types(model.graph, step.op_types)]
    unknown = Planner(model.graph, get_target(target).table, exclude=excluded).unknown()
    if unknown:
        raise OnnxqError(f"op {unknown[0]} has no QDQ rule for target '{target}'"
                         f"{f' (nor {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
                         "keep such ops in float with --allow-unknown-ops")
