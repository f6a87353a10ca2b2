"""Argument checks at the boundary of `onnxq.quantize`, before any work.

A wrong type raises OnnxqTypeError, a value out of range OnnxqValueError (both OnnxqErrors, see
onnxq.errors), each naming the argument; the output path is checked against every file the run
reads and for writability (onnxq.ir.outputs), so a mistake costs no calibration time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.ir.outputs import calibration_files, check_outputs, files_read_by_model
from onnxq.torch_export import is_torch_module

_PATH = (str, os.PathLike)


# (argument, value, the only target that takes it, why)
_ONE_TARGET = (
    ("activation_type", "uint8", "ort-cpu", "TensorRT takes int8 activations only (uint8 is for --target ort-cpu)"),
    ("weight_type", "uint8", "ort-cpu", "TensorRT takes signed weights only (uint8 is for --target ort-cpu)"),
    ("format", "fp8", "tensorrt", "fp8 is for target 'tensorrt' (ONNX Runtime's CPU kernels are integer only)"),
    ("high_precision", "fp16", "tensorrt",
     "fp16 is for target 'tensorrt' (ONNX Runtime's integer CPU kernels take FP32 around them)"),
)


def check_quantize_arguments(model: Any, calibration_data: Any, *, output: Any, recipe: Any, target: Any,
                             per_tensor: Any, calibrator: Any, rounding: Any, exclude: Any, op_types: Any,
                             activation_type: Any, format: Any, high_precision: Any, weight_type: Any,
                             calibration_shapes: Any, bits_budget: Any, bit_allocation: Any, bits_cache: Any, agq: Any,
                             batch_size: Any, max_samples: Any,
                             padding_mask: Any, allow_unknown_ops: Any, verify_exact: Any, show_progress: Any,
                             log: Any, example_inputs: Any) -> None:
    """Raise OnnxqTypeError / OnnxqValueError / OnnxqError for the first unusable argument."""
    from onnxq.quant.calibrate import CALIBRATORS
    from onnxq.quant.targets import TARGETS
    from onnxq.stats.calib_data import CalibrationSet

    if is_torch_module(model):
        if example_inputs is None:
            raise OnnxqTypeError("example_inputs: a torch.nn.Module model needs example inputs to export it "
                                 "(a tensor or a tuple of tensors, as forward takes them)")
    else:
        _type("model", model, _PATH + (onnx.ModelProto, ir.Model),
              "a path, an onnx.ModelProto, an onnx_ir Model or a torch.nn.Module")
        if example_inputs is not None:
            raise OnnxqValueError("example_inputs: only used to export a torch.nn.Module model; "
                                  f"this model is a {type(model).__name__}")
    if calibration_data is None or isinstance(calibration_data, (bytes, int, float, bool)) or not (
            isinstance(calibration_data, _PATH + (Mapping, Iterable, CalibrationSet))
            or hasattr(calibration_data, "get_next")):
        raise OnnxqTypeError(f"calibration_data: expected an .npz/.npy path or folder, a dict of arrays, an iterable "
                             f"of feeds or a CalibrationDataReader, not {type(calibration_data).__name__}")
    _type("output", output, _PATH + (type(None),), "a path or None")
    _type("recipe", recipe, _PATH + (list, type(None)), "a recipe name or file, a list of steps, or None")
    if isinstance(recipe, list) and not recipe:
        raise OnnxqValueError("recipe: an empty list of steps would quantize nothing; give at least one step")
    _type("target", target, (str,), f"one of {', '.join(TARGETS)}")
    if target not in TARGETS:
        raise OnnxqValueError(f"target: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    given = {"calibrator": calibrator, "rounding": rounding, "activation_type": activation_type,
             "weight_type": weight_type, "format": format, "high_precision": high_precision}
    for name, choices in (("calibrator", (*CALIBRATORS, "auto")), ("rounding", ("nearest", "gptq", "adaround", "flexround")),
                          ("activation_type", ("int8", "uint8")), ("weight_type", ("int8", "uint8")),
                          ("format", ("int8", "fp8")), ("high_precision", ("fp32", "fp16"))):
        value, optional = given[name], name != "high_precision"
        _type(name, value, (str, type(None)) if optional else (str,),
              f"one of {', '.join(choices)}" + (" or None" if optional else ""))
        if value is not None and value not in choices:
            raise OnnxqValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    for name, value, only, why in _ONE_TARGET:  # values one target alone takes
        if given[name] == value and target != only:
            raise OnnxqValueError(f"{name}: {why}")
    if format == "fp8" and rounding in ("adaround", "flexround"):
        raise OnnxqValueError(f"format: rounding '{rounding}' learns integer weights; with fp8 use nearest or gptq")
    if format == "fp8" and calibrator in ("entropy", "mse"):
        raise OnnxqValueError(f"format: calibrator '{calibrator}' chooses its clip for the uniform INT8 grid; with fp8 "
                              "use max, percentile or auto")
    _type("bits_budget", bits_budget, (int, float, type(None)), "an average number of weight bits (2 to 8) or None")
    if bits_budget is not None and not 2 <= bits_budget <= 8:
        raise OnnxqValueError(f"bits_budget: {bits_budget} is outside 2 to 8 average weight bits")
    _type("bit_allocation", bit_allocation, (str,), "one of luq, sensitivity, uniform")
    if bit_allocation not in ("luq", "sensitivity", "uniform"):
        raise OnnxqValueError(f"bit_allocation: {bit_allocation!r} is not one of luq, sensitivity, uniform")
    if bits_budget is not None and format == "fp8":
        raise OnnxqValueError("bits_budget: mixed integer widths do not combine with format fp8")
    _type("bits_cache", bits_cache, _PATH + (type(None),), "a path or None")
    _type("agq", agq, (bool,), "True or False")
    if agq and rounding not in (None, "gptq"):
        raise OnnxqValueError(f"agq: weights GPTQ's statistics by the experts' gates; rounding {rounding!r} has none")
    _type("calibration_shapes", calibration_shapes, (str, Mapping, type(None)),
          "'NAME:D1xD2x...,...', a dict of input name to shape, or None")
    _names("exclude", exclude, "node names or regular expressions")
    for pattern in exclude or ():
        problem = regex_problem(pattern)
        if problem:
            raise OnnxqValueError(f"exclude: {problem}")
    _names("op_types", op_types, "op types such as 'Conv'")
    _type("per_tensor", per_tensor, (bool, type(None)), "True, False or None")
    _count("batch_size", batch_size, optional=False)
    _count("max_samples", max_samples, optional=True)
    _type("padding_mask", padding_mask, (str, type(None)), "an input name, 'auto' or None")
    for name, value in (("allow_unknown_ops", allow_unknown_ops), ("verify_exact", verify_exact),
                        ("show_progress", show_progress)):
        _type(name, value, (bool,), "True or False")
    if not callable(log):
        raise OnnxqTypeError(f"log: expected a callable such as print, not {type(log).__name__}")
    if isinstance(recipe, _PATH):
        _check_recipe_text(Path(recipe))
    if output is not None:
        if Path(output).suffix != ".onnx":
            raise OnnxqValueError(f"output: {output} must end in .onnx")
        reads = calibration_files(calibration_data)
        if isinstance(model, _PATH):
            reads += files_read_by_model(model)
        if isinstance(recipe, _PATH) and Path(recipe).is_file():
            reads.append(("the recipe", Path(recipe)))
        check_outputs([("output", output), ("output's external-data file", f"{output}.data")], reads)


def _type(name: str, value: Any, types: tuple, wanted: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise OnnxqTypeError(f"{name}: expected {wanted}, not {type(value).__name__} {_short(value)}")


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` cannot select nodes (empty, or not a Python regular expression), or None."""
    if not pattern:
        return "an empty pattern selects nothing"
    try:
        re.compile(pattern)
    except re.error as exc:
        return (f"'{pattern}' is not a valid regular expression ({exc}); "
                "escape special characters with a backslash to name a node literally")
    return None


def _names(name: str, value: Any, what: str) -> None:
    """None, or a list/tuple of non-empty strings (a bare string would be read character by character)."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise OnnxqTypeError(f"{name}: expected a list of {what} or None, not {type(value).__name__} {_short(value)}")
    if any(not v for v in value):
        raise OnnxqValueError(f"{name}: an empty string names nothing")


def _count(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise OnnxqTypeError(f"{name}: expected a positive integer{' or None' if optional else ''}, "
                             f"not {type(value).__name__} {_short(value)}")
    if value < 1:
        raise OnnxqValueError(f"{name}: must be at least 1, not {value}")


def _check_recipe_text(path: Path) -> None:
    """A recipe file must be UTF-8 text (YAML and JSON are); say so before the YAML reader chokes."""
    if not path.is_file():
        return  # a built-in name, or missing: the recipe loader says which
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxqError(f"{path}: recipe is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise OnnxqError(f"{path}: cannot read recipe ({exc.strerror})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
