"""Model checks run after every pass: the ONNX checker and (strict) shape inference.

Both run on a skeleton of the model whose large weights are graph inputs of the same type and
shape (see `skeleton`): neither needs weight values beyond small constants such as shapes, so the
answers are the same, each check is quick, and models above protobuf's 2 GiB limit need no copy.
Shape information found here is merged back into the IR, so later passes and calibration know
the element type and shape of every intermediate tensor.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import to_proto_without_weights


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
    try:  # full_check adds strict, type-checked shape inference to the one parse the checker makes
        onnx.checker.check_model(skeleton(model), full_check=strict)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def skeleton(model: ir.Model) -> onnx.ModelProto:
    """`model` as a proto whose large (and externally stored) main-graph initializers are graph inputs
    of the same type and shape instead; small ones stay inline, so shape inference still reads them."""
    proto, held = to_proto_without_weights(model)
    graph = proto.graph
    listed = {v.name for v in graph.input}
    kept = [t for t in graph.initializer if t.name not in held]
    for tensor in graph.initializer:
        if tensor.name in held and tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def input_problem(model: ir.Model) -> tuple[bool, str | None]:
    """(strict, problem) for the input model: strict shape inference is used later only if the input
    passes it; `problem` is the checker complaint the input already has, if any."""
    if find_problem(model, strict=True) is None:
        return True, None
    return False, find_problem(model, strict=False)


def infer_shapes(model: ir.Model) -> None:
    """Annotate every tensor of `model` with the type and shape ONNX shape inference finds."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
