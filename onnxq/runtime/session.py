"""ONNX Runtime plumbing: sessions, intermediate outputs exposed as graph outputs, and latency.

Everything that executes a model goes through here, on the CPU execution provider, so calibration,
comparison, verification of exact passes and benchmarks all see the same runtime settings.
Statistics over the calibration data run through onnxq.stats.service, which builds on these.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import _PROTOBUF_LIMIT, to_proto


def session(model: ir.Model | onnx.ModelProto | str | Path, *, threads: int = 0,
            optimize: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession for an in-memory model or a path (models over 2 GiB go via a temp file)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: failures reach the caller as exceptions, not as log lines
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, (str, Path)):
            return ort.InferenceSession(str(model), options, providers=providers)
        proto = to_proto(model)
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


def exposing(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include the intermediate tensors `names`."""
    proto = to_proto(model)
    existing = {o.name for o in proto.graph.output}
    types = _elem_types(model)
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return proto


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
