"""Loading and saving models safely.

Loading checks that the file exists and really is an ONNX model before anything else touches it:
a graph with outputs, an opset, every node input defined, and readable `onnxq.*` metadata; external
data may not lie outside the model's folder (`..`, absolute paths and symlinks are refused) and must
fit its file. External data is not read: its tensors stay in their file, memory-mapped when used, so
a model above protobuf's 2 GiB limit is never built as one proto. Saving goes through
onnxq.ir.outputs: a temporary file beside the target renamed into place, so a failure never leaves
a half-written model behind, and never over the input model; large models and models that came with
external data are written with it (`<output>.data`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import onnx
import onnx.numpy_helper
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxq import metadata
from onnxq.errors import OnnxqError
from onnxq.ir.outputs import files_read_by_model, same_file, write_atomically

# Protobuf cannot serialise a model above 2 GiB in one piece; larger ones keep weights beside it.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Return `source` as an onnx_ir Model, checking that a path names a readable ONNX file."""
    if isinstance(source, ir.Model):
        check_onnxq_metadata(source, "model")
        return source
    if isinstance(source, onnx.ModelProto):
        _check_graph(source, "model")
        if source.ir_version < _FIRST_IR_WITH_OPTIONAL_INPUTS:
            source = _lifted_copy(source)
        model = ir.from_proto(source)
        check_onnxq_metadata(model, "model")
        return model
    path = Path(source)
    if not path.exists():
        raise OnnxqError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a folder, expected an .onnx file")
    try:  # weights in external files stay there: checked here, memory-mapped when read
        proto = onnx.load(str(path), load_external_data=False)
        external = _check_external_data(proto, path.parent)
    except (DecodeError, ValueError, RuntimeError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise OnnxqError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node and not proto.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message
        raise OnnxqError(f"{path}: not an ONNX model (no graph found in the file)")
    _check_graph(proto, str(path))
    _lift_ir_version(proto)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:  # onnx_ir raises assorted errors on malformed protos
        raise OnnxqError(f"{path}: corrupt ONNX model ({_first_line(exc)})") from None
    if external:
        ir.external_data.set_base_dir(model.graph, path.parent)
    check_onnxq_metadata(model, str(path))
    return model


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> bool:
    """Check, without reading them, that the external-data references of `proto` are what onnx.load
    would accept: a file inside `folder` (no `..`, absolute path or symlink), the range within the file
    and as long as the tensor's type and dims need. True when there is any external data."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, _open_external_data_fd

    found = False
    for tensor in _get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = ExternalDataInfo(tensor)
        fd = _open_external_data_fd(str(folder), info.location, tensor.name, True)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        expected = _stored_bytes(tensor)
        if offset > size or length > size - offset or (expected is not None and length != expected):
            raise ValueError(f"external data of tensor '{tensor.name}' ({length} bytes at offset {offset}) does "
                             f"not fit its file of {size} bytes or its dims {list(tensor.dims)}")
    return found


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data `tensor`'s type and dims call for (None for a type onnx does not know)."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    bits = _PACKED_BITS.get(tensor.data_type, dtype.itemsize * 8)
    return (math.prod(tensor.dims) * bits + 7) // 8


def _check_graph(proto: onnx.ModelProto, label: str) -> None:
    """What every later step takes for granted: an opset, graph outputs, and every name defined."""
    domains = {entry.domain or "ai.onnx" for entry in proto.opset_import}
    used = {node.domain or "ai.onnx" for node in proto.graph.node}
    if not proto.opset_import or "ai.onnx" in used - domains:
        raise OnnxqError(f"{label}: the model's opset_import does not declare the opset of its ops "
                         f"(declared: {sorted(domains) or 'none'}; used: {sorted(used)})")
    graph = proto.graph
    if not graph.output:
        raise OnnxqError(f"{label}: the graph has no outputs")
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {name for node in graph.node for name in node.output}
    for node in graph.node:
        for name in node.input:
            if name not in defined:
                raise OnnxqError(f"{label}: input '{name}' of node '{node.name}' ({node.op_type}) is not a graph "
                                 "input, an initializer or a node output")
    for out in graph.output:
        if out.name not in defined:
            raise OnnxqError(f"{label}: graph output '{out.name}' is computed by no node")
    for value in [*graph.input, *graph.output]:
        kind = value.type.WhichOneof("value")
        if kind is None:
            raise OnnxqError(f"{label}: graph input or output '{value.name}' has no type")
        if kind == "tensor_type" and value.type.tensor_type.elem_type not in _KNOWN_TYPES:
            raise OnnxqError(f"{label}: graph input or output '{value.name}' has unknown element type "
                             f"{value.type.tensor_type.elem_type}")
    constants = [a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    for tensor in [*graph.initializer, *constants]:
        problem = _tensor_problem(tensor)
        if problem:
            raise OnnxqError(f"{label}: tensor '{tensor.name}' is corrupt ({problem})")


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """Why `tensor`'s stored data cannot be what its type and dims promise, or None. Raw bytes (how
    exporters store weights) are only measured; the rarer typed fields are decoded."""
    if any(d < 0 for d in tensor.dims):
        return f"negative dimension in {list(tensor.dims)}"
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return f"unknown element type {tensor.data_type}"
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None  # read from its file by onnx.load, which checks it
    count = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        bits = _PACKED_BITS.get(tensor.data_type, dtype.itemsize * 8)
        expected = (count * bits + 7) // 8
        if len(tensor.raw_data) != expected:
            return f"{len(tensor.raw_data)} bytes of data for dims {list(tensor.dims)}, expected {expected}"
        return None
    try:
        onnx.numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises ValueError and others for wrong element counts
        return _first_line(exc)
    return None


_KNOWN_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
# element types stored several to a byte in raw data
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}


# IR version 3 requires every initializer to be listed as a graph input, a rule the initializers that
# passes and Q/DQ insertion add would break; listed, weights also look overridable, so nothing treats
# them as constants. Such models are read as IR 4, where an initializer is a constant unless listed,
# with the listing dropped: in IR 3 it was compulsory, so it never meant "meant to be fed".
_FIRST_IR_WITH_OPTIONAL_INPUTS = 4


def _lift_ir_version(proto: onnx.ModelProto) -> None:
    if proto.ir_version >= _FIRST_IR_WITH_OPTIONAL_INPUTS:
        return
    proto.ir_version = _FIRST_IR_WITH_OPTIONAL_INPUTS
    weights = {t.name for t in proto.graph.initializer}
    kept = [v for v in proto.graph.input if v.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def _lifted_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # the caller's object is never edited
    _lift_ir_version(copy)
    return copy


def check_onnxq_metadata(model: ir.Model, label: str) -> None:
    """Refuse `onnxq.*` metadata that onnxq itself would not have written (hand-edited or corrupted),
    in one line, instead of failing wherever it is read."""
    props = model.metadata_props
    for key, fields in ((metadata.PASSES_KEY, _PASS_FIELDS), (metadata.FIDELITY_KEY, _FIDELITY_FIELDS)):
        if key not in props:
            continue
        try:
            entries = json.loads(props[key])
        except ValueError:
            entries = None
        if not isinstance(entries, list) or not all(_entry_ok(e, fields) for e in entries):
            raise OnnxqError(f"{label}: model metadata '{key}' is malformed (expected the JSON list onnxq "
                             "writes); remove it or re-export the model")
    for node in model.graph.all_nodes():
        text = node.metadata_props.get(metadata.RANGE_MARGIN_KEY)
        if text is not None and not _positive_number(text):
            raise OnnxqError(f"{label}: node '{node.name}' has malformed metadata {metadata.RANGE_MARGIN_KEY}={text!r}")


_NUMBER = (int, float)
# the fields each entry must have (with their types) / may have
_PASS_FIELDS = ({"name": str, "kind": str, "options": dict, "summary": dict, "seconds": _NUMBER}, {})
_FIDELITY_FIELDS = ({}, {"replacement": str, "node": str, "function": str, "method": str, "input_quantized": bool,
                         "replaced_ops": list, "max_steps": _NUMBER + (type(None),),
                         "mean_steps": _NUMBER + (type(None),)})


def _entry_ok(entry, fields) -> bool:
    required, optional = fields
    if not isinstance(entry, dict):
        return False
    if any(not isinstance(entry.get(k), t) or isinstance(entry.get(k), bool) and t is _NUMBER
           for k, t in required.items()):
        return False
    return all(k not in entry or isinstance(entry[k], t) for k, t in optional.items())


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


# Initializers from this size up are kept out of the protos built for the checker and ONNX Runtime.
LARGE_TENSOR_BYTES = 1 << 20
# The location written into such a proto's references: nothing reads it (see to_proto_without_weights).
WEIGHTS_IN_MEMORY = "onnxq-weights-held-in-memory"


def to_proto_without_weights(model: ir.Model, *, min_bytes: int = LARGE_TENSOR_BYTES,
                             keep=lambda tensor: False) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """`model` as a proto in which every main-graph initializer of at least `min_bytes`, and every one
    of at least LARGE_TENSOR_BYTES still in an external file, is a data-less reference (location
    WEIGHTS_IN_MEMORY, offset 0, length its byte size), plus those tensors by name. Smaller tensors in
    an external file are read in: ONNX Runtime's fusions need constants such as Clip's bounds in the
    model. Type, dims and small constants are all there, so the checker and shape inference see the
    model as it is, and a runtime given the tensors can run it; the weights are never copied, so this
    works above protobuf's 2 GiB. `keep(tensor)` True keeps a tensor inline. `model` is left as it was."""
    held, read_in = {}, {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        external = isinstance(tensor, ir.ExternalTensor)
        if not keep(tensor) and (tensor.nbytes >= min_bytes or (external and tensor.nbytes >= LARGE_TENSOR_BYTES)):
            held[value.name] = tensor
        elif external:
            read_in[value.name] = tensor
    values = model.graph.initializers
    try:
        for name, tensor in held.items():
            values[name].const_value = ir.ExternalTensor(WEIGHTS_IN_MEMORY, 0, tensor.nbytes, tensor.dtype,
                                                         shape=tensor.shape, name=name)
        for name, tensor in read_in.items():
            values[name].const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
        proto = ir.to_proto(model)
    finally:
        for name, tensor in {**held, **read_in}.items():
            values[name].const_value = tensor
    return proto, held


def has_external_data(model: ir.Model) -> bool:
    """True when some initializer of `model` is still read from an external file (loaded lazily)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
               external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (see onnxq.ir.outputs); refuse to overwrite `source`.

    With `external_data` the tensors go to `<path>.data` beside it (written and renamed into place
    first, then the model). None decides: external data when `source` has external data or the model
    still reads weights from an external file (a model that came with external data leaves with it),
    or when the weights pass protobuf's 2 GiB limit. An onnx_ir model is written
    by onnx_ir, tensor by tensor, never as one proto, and still points at its own weights afterwards."""
    path = Path(path)
    if source is not None and same_file(path, Path(source)):
        raise OnnxqError(f"{path}: output path is the input model; choose another output path")
    if path.suffix != ".onnx":
        raise OnnxqError(f"{path}: output path must end in .onnx")
    if not path.parent.exists():
        raise OnnxqError(f"{path.parent}: output folder does not exist")
    data_name = path.name + ".data"
    if external_data is None and source is not None:
        external_data = len(files_read_by_model(source)) > 1 or None
    if isinstance(model, ir.Model):
        if external_data is None:
            external_data = has_external_data(model) or weight_bytes(model) > _PROTOBUF_LIMIT
        proto = None if external_data else _inline_proto(model)
    else:
        proto = model
        if external_data is None:
            external_data = proto.ByteSize() > _PROTOBUF_LIMIT

    def write(tmp: Path) -> None:
        tmp_data = tmp.with_name(tmp.name + ".data")
        if not external_data:
            onnx.save_model(proto, str(tmp))
            return
        if proto is None:
            ir.save(model, tmp, external_data=tmp_data.name)
        else:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name)
        _rename_external_data(tmp, tmp_data.name, data_name)
        os.replace(tmp_data, path.parent / data_name)

    return write_atomically(path, write, extra_suffixes=(".data",))


def _inline_proto(model: ir.Model) -> onnx.ModelProto:
    """`model` as one proto with every weight in it, those still in external files read in."""
    proto = ir.to_proto(model)
    external = {v.name: v.const_value for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)}
    for tensor in proto.graph.initializer:
        if tensor.name in external:
            stored = external[tensor.name]
            tensor.CopyFrom(ir.serde.serialize_tensor(ir.Tensor(stored.numpy(), dtype=stored.dtype, name=tensor.name)))
    return proto


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all main-graph initializers of `model` (read from metadata: nothing is loaded)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _rename_external_data(model_path: Path, old: str, new: str) -> None:
    """Point the external-data references of the saved model at the final data file name."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(proto, str(model_path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
