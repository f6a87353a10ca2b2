"""ONNX Runtime plumbing: sessions, intermediate outputs exposed as graph outputs, and latency.

Everything that executes a model goes through here, on the CPU execution provider, so calibration,
comparison, verification of exact passes and benchmarks all see the same runtime settings.
Statistics over the calibration data run through onnxq.stats.service, which builds on these.

A large onnx_ir model reaches ONNX Runtime without its weights serialised: the proto names them as
external data (see onnxq.ir.modelio.to_proto_without_weights) and the session options hand ORT the
arrays themselves (memory-mapped ones stay mapped), which ORT takes instead of reading any file. So
models above protobuf's 2 GiB limit run without a copy of their weights in a proto (see `detach`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import _PROTOBUF_LIMIT, LARGE_TENSOR_BYTES, to_proto_without_weights, weight_bytes


@dataclass(frozen=True)
class DetachedModel:
    """A proto whose large initializers are data-less external references, and those tensors by name."""

    proto: onnx.ModelProto
    weights: dict[str, ir.TensorProtocol]


# element types numpy (and so OrtValue.ortvalue_from_numpy) holds natively; others stay in the proto
ARRAY_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
                ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
                ir.DataType.UINT64, ir.DataType.BOOL}


def detach(model: ir.Model) -> DetachedModel:
    """`model` ready for `session`: out of the proto go the weights still in external files and, when
    all weights together pass 1 GiB, every large one. Below that the weights stay inline: serialising
    them is cheap, and a model that fits runs exactly as it always did."""
    large = weight_bytes(model) > _PROTOBUF_LIMIT // 2
    proto, weights = to_proto_without_weights(model, min_bytes=LARGE_TENSOR_BYTES if large else _PROTOBUF_LIMIT,
                                              keep=lambda t: t.dtype not in ARRAY_TYPES)
    return DetachedModel(proto, weights)


# ONNX Runtime's extended optimizations (1.31 and before) fuse DQ → Conv/MatMul into integer kernels
# (QLinearConv, MatMulIntegerToFloat) without checking the type, which then refuse FP8 inputs; its CPU
# provider has no FP8 arithmetic to lose, so FP8 models run at the basic level (docs/fp8.md).
FP8_OPTIMIZATION_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
_FP8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ}


def holds_fp8(model) -> bool:
    """Whether a model (onnx_ir, proto, detached or path) stores a tensor in FP8 or quantizes to it."""
    if isinstance(model, (str, Path)):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # missing or not ONNX: ONNX Runtime's own load says so, in session()
            return False
    if isinstance(model, DetachedModel):
        model = model.proto
    if isinstance(model, ir.Model):
        return any(v.dtype is not None and v.dtype.value in _FP8 for v in model.graph.initializers.values()) or any(
            n.op_type == "QuantizeLinear" and n.outputs[0].dtype is not None and n.outputs[0].dtype.value in _FP8
            for n in model.graph)
    return any(t.data_type in _FP8 for t in model.graph.initializer) or any(
        a.name == "output_dtype" and a.i in _FP8 for n in model.graph.node if n.op_type == "QuantizeLinear"
        for a in n.attribute)


def session(model: ir.Model | onnx.ModelProto | DetachedModel | str | Path, *, threads: int = 0,
            optimize: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory model or a path. An onnx_ir model's large weights reach
    ORT as arrays, not serialised; a ModelProto over 2 GiB goes via a temporary file."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: failures reach the caller as exceptions, not as log lines
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif holds_fp8(model):
        options.graph_optimization_level = FP8_OPTIMIZATION_LEVEL
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, (str, Path)):
            return ort.InferenceSession(str(model), options, providers=providers)
        if isinstance(model, ir.Model):
            model = detach(model)
        if isinstance(model, DetachedModel):
            return _detached_session(model, options, providers)
        proto = model
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=providers)
    except ort.capi.onnxruntime_pybind11_state.Fail as exc:
        raise OnnxqError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None
    except (ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
        raise OnnxqError(f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0]}") from None


def _detached_session(model: DetachedModel, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    names = list(model.weights)
    # np.require, not ascontiguousarray: the latter makes a 0-d array 1-d, which ORT refuses
    values = [ort.OrtValue.ortvalue_from_numpy(np.require(t.numpy(), requirements="C")) for t in model.weights.values()]
    if names:
        options.add_external_initializers(names, values)
    sess = ort.InferenceSession(model.proto.SerializeToString(), options, providers=providers)
    sess._onnxq_weights = values  # ORT reads the arrays in place: they must live as long as the session
    return sess


def exposing(model: ir.Model, names: Sequence[str]) -> DetachedModel:
    """A copy of `model` (for `session`) whose graph outputs also include the intermediate tensors `names`."""
    detached = detach(model)
    proto = detached.proto
    existing = {o.name for o in proto.graph.output}
    types = _elem_types(model)
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return detached


def _elem_types(model: ir.Model) -> dict[str, int]:
    types = {}
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        for value in node.outputs:
            if value.name and value.dtype is not None:
                types[value.name] = int(value.dtype)
    for value in model.graph.inputs:
        if value.dtype is not None:
            types[value.name] = int(value.dtype)
    return types


def latency_ms(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], *,
               runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median latency of each session on `feed`, runs alternating between sessions in one process."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}
