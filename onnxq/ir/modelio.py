"""Loading and saving models safely.

Loading checks that the file exists and really is an ONNX model before anything else touches it.
Saving writes to a temporary file beside the target and renames it into place, so a failure
never leaves a half-written model behind, and refuses to overwrite the input model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxq.errors import OnnxqError

# Protobuf cannot serialise a model above 2 GiB in one piece; larger ones keep weights beside it.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Return `source` as an onnx_ir Model, checking that a path names a readable ONNX file."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.from_proto(source)
    path = Path(source)
    if not path.exists():
        raise OnnxqError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise OnnxqError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node and not proto.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message
        raise OnnxqError(f"{path}: not an ONNX model (no graph found in the file)")
    try:
        return ir.from_proto(proto)
    except Exception as exc:  # onnx_ir raises assorted errors on malformed protos
        raise OnnxqError(f"{path}: corrupt ONNX model ({_first_line(exc)})") from None


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write `model` to `path` atomically; refuse to overwrite `source` (the input model)."""
    path = Path(path)
    if source is not None and _same_file(path, Path(source)):
        raise OnnxqError(f"{path}: output path is the input model; choose another output path")
    if path.suffix != ".onnx":
        raise OnnxqError(f"{path}: output path must end in .onnx")
    if not path.parent.exists():
        raise OnnxqError(f"{path.parent}: output folder does not exist")
    proto = to_proto(model)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = path.name + ".data"
    try:
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            tmp_data = tmp.with_name(tmp.name + ".data")
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name)
            _rename_external_data(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
        raise
    return path


def _rename_external_data(model_path: Path, old: str, new: str) -> None:
    """Point the external-data references of the saved model at the final data file name."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(proto, str(model_path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
