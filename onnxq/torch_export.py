"""`onnxq.export`: a PyTorch module to an ONNX file in the form onnxq's recognisers and TensorRT read best.

The module is put in eval mode and run under torch.no_grad. Exporter "auto" tries torch's dynamo
exporter (torch.export, then onnxscript's optimizer; opset 18 or later) and falls back to the
TorchScript exporter (opset 17) when dynamo cannot trace the module. Inputs and outputs are named
(the forward signature's parameter names unless given), axis 0 of every input and output is dynamic
by default, and weights over protobuf's 2 GiB limit go to an external-data file. ONNX Runtime then
runs the exported file on the example inputs and every output must match torch's within
|ort - torch| <= rtol * |torch| + atol * max|torch| (atol relative to the output's scale), or an
OnnxqError names the output. The file is written atomically: a failure leaves nothing behind.

torch is imported inside the functions only: `import onnxq` stays torch-free.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError

EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_OPSET = 18  # the dynamo exporter's own opset; lower ones go through the version converter
TORCHSCRIPT_OPSET = 17  # the TorchScript exporter's best-tested opset, read by every TensorRT 8.6+
RTOL, ATOL = 1e-3, 1e-4


def is_torch_module(obj: Any) -> bool:
    """True for a torch.nn.Module, without importing torch (a module can only exist if torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def export(module: Any, example_inputs: Any, path: str | os.PathLike, *, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, dynamic_axes: str | Mapping | None = "batch",
           opset: int | None = None, exporter: str = "auto", rtol: float = RTOL, atol: float = ATOL,
           log: Callable[[str], Any] = print) -> Path:
    """Export `module` run on `example_inputs` (a tensor or a tuple of tensors) to `path` (.onnx).

    dynamic_axes: "batch" (axis 0 of every input and output), "none", or torch's form
    {name: {axis: "dim_name"}}. exporter: "auto" (dynamo, falling back to TorchScript), "dynamo" or
    "torchscript". opset: None takes the exporter's default (18 for dynamo, 17 for TorchScript).
    Returns `path`. Raises OnnxqError for unusable arguments, a failed export, or ONNX Runtime
    outputs that differ from torch's beyond rtol / atol (see the module docstring).
    """
    torch = _torch()
    inputs = _check_arguments(torch, module, example_inputs, path, exporter=exporter, opset=opset,
                              dynamic_axes=dynamic_axes, input_names=input_names, output_names=output_names)
    from onnxq.ir.outputs import check_outputs

    path = Path(path)
    check_outputs([("path", path), ("path's external-data file", f"{path}.data")], [])
    module.eval()
    with torch.no_grad():
        try:
            expected = flatten_outputs(module(*inputs))
        except Exception as exc:
            raise OnnxqError(f"the module fails on the example inputs: {type(exc).__name__}: {_first_line(exc)}") from None
    names_in = list(input_names) if input_names else _forward_names(module, len(inputs))
    names_out = list(output_names) if output_names else _output_names(len(expected))
    if len(names_in) != len(inputs):
        raise OnnxqValueError(f"input_names: {len(names_in)} name(s) for {len(inputs)} example input(s)")
    if len(names_out) != len(expected):
        raise OnnxqValueError(f"output_names: {len(names_out)} name(s) for {len(expected)} output(s) of the module")
    axes = _dynamic_axes(dynamic_axes, names_in, names_out, inputs, expected)
    feeds = {name: _numpy(t) for name, t in zip(names_in, inputs, strict=True)}
    reference = {name: _numpy(t) for name, t in zip(names_out, expected, strict=True)}
    with tempfile.TemporaryDirectory(prefix="onnxq-export-") as folder:
        exported = Path(folder) / "model.onnx"
        _run_exporter(torch, module, inputs, exported, names_in, names_out, axes, opset, exporter, log)
        check_matches(exported, feeds, reference, rtol=rtol, atol=atol)
        return _save(exported, path, axes, log)


def check_matches(model_path: str | os.PathLike, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  *, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Run `model_path` in ONNX Runtime on `feeds` (those of its inputs it has) and compare each
    output named in `reference`; raise OnnxqError naming the first one outside the tolerance."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        wanted = [i.name for i in sess.get_inputs()]
        missing = [n for n in wanted if n not in feeds]
        if missing:
            raise OnnxqError(f"the exported model has input '{missing[0]}' that matches no example input")
        produced = [o.name for o in sess.get_outputs()]
        if sorted(produced) != sorted(reference):
            raise OnnxqError(f"the exported model's outputs {produced} are not the module's {list(reference)}")
        got = dict(zip(produced, sess.run(produced, {n: feeds[n] for n in wanted}), strict=True))
    except OnnxqError:
        raise
    except Exception as exc:
        raise OnnxqError(f"ONNX Runtime cannot run the exported model: {_first_line(exc)}") from None
    for name, want in reference.items():
        have = got[name]
        if have.shape != want.shape:
            raise OnnxqError(f"export check: output '{name}' has shape {list(have.shape)} in ONNX Runtime, "
                             f"{list(want.shape)} in torch")
        have64, want64 = have.astype(np.float64), want.astype(np.float64)
        scale = float(np.max(np.abs(want64))) if want64.size else 0.0
        diff = np.abs(have64 - want64)
        excess = diff - rtol * np.abs(want64) - atol * (scale or 1.0)
        if excess.size and not np.all(excess <= 0):  # NaN in either side fails too
            raise OnnxqError(f"export check: output '{name}' differs between ONNX Runtime and torch by up to "
                             f"{float(np.nanmax(diff)):.3g} (output scale {scale:.3g}, rtol {rtol:g}, atol {atol:g} "
                             "of the scale); the exported graph does not compute what the module does")


def flatten_outputs(value: Any) -> list:
    """The tensors a module returned, in order: a tensor, a tuple / list, or a dict (a transformers
    ModelOutput is one), None entries dropped as the exporters drop them."""
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = [v for v in value.values() if v is not None]
    if isinstance(value, (tuple, list)):
        return [t for v in value if v is not None for t in flatten_outputs(v)]
    raise OnnxqError(f"the module returns {type(value).__name__}; export needs tensors (or tuples / dicts of them)")


def _run_exporter(torch, module, inputs: tuple, out: Path, names_in: list[str], names_out: list[str],
                  axes: dict | None, opset: int | None, exporter: str, log) -> None:
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(torch, module, inputs, out, names_in, names_out, axes, opset)
            return
        except Exception as exc:
            if exporter == "dynamo":
                raise OnnxqError(f"the dynamo exporter failed: {type(exc).__name__}: {_first_line(exc)}") from None
            log(f"export: the dynamo exporter failed ({type(exc).__name__}: {_first_line(exc)}); "
                f"falling back to the TorchScript exporter (opset {opset or TORCHSCRIPT_OPSET})")
            for leftover in out.parent.iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings, the "legacy exporter" notice
            torch.onnx.export(module, inputs, str(out), dynamo=False, opset_version=opset or TORCHSCRIPT_OPSET,
                              input_names=names_in, output_names=names_out, dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as exc:
        raise OnnxqError(f"the TorchScript exporter failed: {type(exc).__name__}: {_first_line(exc)}") from None


def _export_dynamo(torch, module, inputs: tuple, out: Path, names_in: list[str], names_out: list[str],
                   axes: dict | None, opset: int | None) -> None:
    # torch.export takes dynamic axes per positional input; Dim.AUTO lets it tie equal axes (the batch
    # of every input) and keep an axis of example size 1 dynamic, where a named Dim would refuse both.
    shapes = None
    if axes:
        shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes.get(n, {})} or None for n in names_in)
    quiet = logging.getLogger("torch.onnx")  # its per-op registration warnings are not the user's concern
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset or DYNAMO_OPSET,
                                        input_names=names_in, output_names=names_out, dynamic_shapes=shapes,
                                        optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    if program is None:
        raise OnnxqError("the dynamo exporter returned no program")
    program.save(str(out))  # external data when the weights pass 2 GiB


def _save(exported: Path, path: Path, axes: dict | None, log) -> Path:
    """Write the checked export to `path` atomically, external data when the weights need it, with
    the dynamic dimensions named as asked (dynamo names them s0, s1, ...); an axis asked dynamic
    that the exporter fixed (the module's code depends on its size) is logged."""
    import onnx_ir as ir

    from onnxq.ir.modelio import save_model

    model = ir.load(exported)
    renames: dict[str, str] = {}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        for axis, dim_name in (axes or {}).get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None and axis < len(value.shape) else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                renames.setdefault(dim.value, dim_name)
            elif isinstance(dim, int):
                log(f"export: axis {axis} of '{value.name}' is fixed at {dim} in the export (the exporter "
                    "specialised it), not dynamic as asked")
    if renames:
        values = [*model.graph.inputs, *(o for node in model.graph.all_nodes() for o in node.outputs)]
        for value in values:
            if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in renames
                                               for d in value.shape):
                value.shape = ir.Shape([ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim)
                                        and d.value in renames else d for d in value.shape])
    return save_model(model, path)


def _check_arguments(torch, module, example_inputs, path, *, exporter, opset, dynamic_axes, input_names,
                     output_names) -> tuple:
    if not isinstance(module, torch.nn.Module):
        raise OnnxqTypeError(f"module: expected a torch.nn.Module, not {type(module).__name__}")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        bad = next((t for t in inputs if not isinstance(t, torch.Tensor)), None)
        raise OnnxqTypeError("example_inputs: expected a torch.Tensor or a tuple of tensors"
                             f"{f', not {type(bad).__name__}' if inputs else ', not an empty tuple'}")
    if not isinstance(path, (str, os.PathLike)):
        raise OnnxqTypeError(f"path: expected a path, not {type(path).__name__}")
    if Path(path).suffix != ".onnx":
        raise OnnxqValueError(f"path: {path} must end in .onnx")
    if not Path(path).parent.exists():
        raise OnnxqError(f"{Path(path).parent}: output folder does not exist")
    if exporter not in EXPORTERS:
        raise OnnxqValueError(f"exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or not 7 <= opset <= 23):
        raise OnnxqValueError(f"opset: expected an integer from 7 to 23 or None, not {opset!r}")
    if not (dynamic_axes in ("batch", "none", None) or isinstance(dynamic_axes, Mapping)):
        raise OnnxqValueError(f"dynamic_axes: expected 'batch', 'none' or a dict, not {dynamic_axes!r}")
    for name, names in (("input_names", input_names), ("output_names", output_names)):
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) and n for n in names)):
            raise OnnxqTypeError(f"{name}: expected a list of non-empty names or None")
    return tuple(inputs)


def _dynamic_axes(spec, names_in: list[str], names_out: list[str], inputs, outputs) -> dict | None:
    """torch's {name: {axis: dim_name}} form of `spec`."""
    if spec in ("none", None):
        return None
    if spec == "batch":
        return {n: {0: "batch"} for n, t in zip([*names_in, *names_out], [*inputs, *outputs], strict=True) if t.dim()}
    unknown = [n for n in spec if n not in names_in and n not in names_out]
    if unknown:
        raise OnnxqValueError(f"dynamic_axes: '{unknown[0]}' is neither an input nor an output "
                              f"(inputs {names_in}, outputs {names_out})")
    axes = {n: dict(a) if isinstance(a, Mapping) else {axis: f"{n}_dim{axis}" for axis in a} for n, a in spec.items()}
    ranks = {n: t.dim() for n, t in zip([*names_in, *names_out], [*inputs, *outputs], strict=True)}
    for name, named in axes.items():
        bad = [axis for axis in named if not isinstance(axis, int) or not 0 <= axis < ranks[name]]
        if bad:
            raise OnnxqValueError(f"dynamic_axes: '{name}' has {ranks[name]} dimensions, so axis {bad[0]!r} does not "
                                  f"exist (axes 0..{ranks[name] - 1})")
    return axes


def _forward_names(module, count: int) -> list[str]:
    """The first `count` positional parameter names of module.forward, input_<i> past them."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input_{i}" for i in range(count)]


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy and ONNX Runtime's Python API have no bfloat16 arrays
        raise OnnxqValueError("bfloat16 tensors: export the module in float32 (module.float(), float inputs); "
                              "onnxq checks the export in ONNX Runtime, whose Python API takes no bfloat16 arrays")
    return tensor.detach().cpu().numpy()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _torch():
    try:
        import torch
    except ImportError:
        raise OnnxqError("export needs torch (pip install torch)") from None
    return torch
