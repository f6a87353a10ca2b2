"""Model checks run after every pass: the ONNX checker and (strict) shape inference.

Shape information found here is merged back into the IR, so later passes and calibration know
the element type and shape of every intermediate tensor.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import _PROTOBUF_LIMIT


def check_model(model: ir.Model, *, strict: bool, what: str, tolerate: str | None = None) -> None:
    """Raise OnnxqError naming `what` (e.g. "after pass 'equalize'") if the model is invalid.

    `tolerate` is a problem the input model already had (see `input_problem`): passes are held to
    not making a model worse, not to fixing what the user brought.
    """
    problem = find_problem(model, strict=strict)
    if problem is not None and problem != tolerate:
        raise OnnxqError(f"model is invalid {what}: {problem}")


def find_problem(model: ir.Model, *, strict: bool) -> str | None:
    """The first ONNX checker or (strict) shape-inference complaint about `model`, or None."""
    proto = ir.to_proto(model)
    try:  # full_check adds strict, type-checked shape inference to the one parse the checker makes
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(proto, full_check=strict)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxq-check-") as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(path), full_check=strict)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def input_problem(model: ir.Model) -> tuple[bool, str | None]:
    """(strict, problem) for the input model: strict shape inference is used later only if the input
    passes it; `problem` is the checker complaint the input already has, if any."""
    if find_problem(model, strict=True) is None:
        return True, None
    return False, find_problem(model, strict=False)


def infer_shapes(model: ir.Model) -> None:
    """Annotate every tensor of `model` with the type and shape ONNX shape inference finds."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
