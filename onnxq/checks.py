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
from onnxq.modelio import _PROTOBUF_LIMIT


def check_model(model: ir.Model, *, strict: bool, what: str) -> None:
    """Raise OnnxqError naming `what` (e.g. "after pass 'equalize'") if the model is invalid."""
    proto = ir.to_proto(model)
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
            if strict:
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxq-check-") as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(path))
                if strict:
                    onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"),
                                                           check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxqError(f"model is invalid {what}: {str(exc).strip().splitlines()[0]}") from None


def strict_inference_passes(model: ir.Model) -> bool:
    """Whether strict shape inference accepts the model as given (some exported models fail it)."""
    try:
        check_model(model, strict=True, what="")
        return True
    except OnnxqError:
        return False


def infer_shapes(model: ir.Model) -> None:
    """Annotate every tensor of `model` with the type and shape ONNX shape inference finds."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
