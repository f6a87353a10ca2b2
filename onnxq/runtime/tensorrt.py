"""`onnxq build-engine`: a strongly typed TensorRT engine from a QDQ model.

Uses TensorRT's Python API: the ONNX parser reads the model, the network is created STRONGLY_TYPED
(precision comes from the Q/DQ nodes, so no INT8/FP16 builder flags are set, as TensorRT 10+
requires for explicit quantization), and the engine inspector reports each layer's precision.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from onnxq.errors import OnnxqError
from onnxq.ir.outputs import write_atomically

INSTALL_HINT = ("TensorRT is not installed: build-engine needs the `tensorrt` Python package and an NVIDIA GPU "
                "(pip install tensorrt --extra-index-url https://pypi.nvidia.com, or `pip install onnxq[tensorrt]`, "
                "on a machine with a CUDA driver)")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise OnnxqError(INSTALL_HINT) from None
    return trt


def parse_shapes(spec: str | None) -> dict[str, tuple[int, ...]]:
    """'input:1x3x224x224,mask:1x128' → {'input': (1, 3, 224, 224), 'mask': (1, 128)}."""
    shapes = {}
    for part in filter(None, (spec or "").split(",")):
        name, _, dims = part.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise OnnxqError(f"--shapes: cannot read '{part}' (write name:1x3x224x224)") from None
    return shapes


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, shapes: dict[str, tuple[int, ...]] | None = None,
                 workspace_mb: int = 4096) -> dict[str, int]:
    """Build and write the engine; return how many layers run in each precision."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OnnxqError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic = True
            shape = (shapes or {}).get(tensor.name)
            if shape is None:
                raise OnnxqError(f"input '{tensor.name}' has dynamic shape {tuple(tensor.shape)}: "
                                 f"give it with --shapes {tensor.name}:1x...")
            profile.set_shape(tensor.name, shape, shape, shape)
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OnnxqError("TensorRT failed to build the engine (see its log above)")
    write_atomically(plan_path, lambda tmp: tmp.write_bytes(bytes(serialized)))  # unique temp name, umask
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return layer_precisions(info)


def layer_precisions(info: dict) -> dict[str, int]:
    """Count engine layers by the data type of their first output (from the inspector's JSON)."""
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if isinstance(layer, str):
            counts["unknown"] += 1
            continue
        outputs = layer.get("Outputs") or [{}]
        fmt = outputs[0].get("Format/Datatype", "unknown")
        counts[fmt.split()[0] if fmt else "unknown"] += 1
    return dict(counts)
