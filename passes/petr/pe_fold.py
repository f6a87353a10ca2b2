"""pe_fold: fold a fixed camera rig's PETR position embedding into the key projections' biases.

Kind: exact, for one fixed camera rig. PETR's cross-attention keys are K = (x + pe)·W_k + b_k with
x the image features and pe the position embedding. The PE is a function of the
camera calibration only, so for a fixed rig it is a constant, and

    K = x·W_k + (pe·W_k + b_k) = x·W_k + C,   C = pe·W_k + b_k   (one (tokens, E) constant per layer)

The rewrite makes every key-projection MatMul read the image features directly and replaces its
bias by C (computed in float64 from the float32 PE). A per-tensor INT8 quantizer then sees only the
image features at the key projection (absmax ~11 for PETR-tiny instead of ~108 for features + PE);
the PE enters in float through the bias, which TensorRT adds in the GEMM epilogue. The exporter
merges the identical Add(memory, pe) of all layers into one node feeding every k_proj; each reader
gets its own C. Readers of memory + pe other than key projections (none in PETR) keep an Add of the
PE as a constant.

Where the rig comes from:
* form A (PE computed in the graph from img2lidar): the `rig` option (.npy, or .npz with the input's
  name or a single array: img2lidar of shape (N, 4, 4) or (1, N, 4, 4)), or else the first
  calibration sample; every calibration sample must then hold the same matrices (checked; the pass
  fails, naming the first sample that differs, otherwise);
* form B (the PE is the graph input pos_embed): the same with the PE itself.
The PE subgraph (form A) is evaluated once with ONNX Runtime, and the graph input it came from is
removed from the model (`input_removed` in the summary): the folded model takes the images only.
Later passes see calibration batches without that input.

The pipeline verifies the result on the first calibration sample (relative tolerance 1e-4); the
only change is float32 rounding of the reassociated sum. The tensors whose values change (the
MatMul outputs x·W_k) are renamed `<name>_pe_folded`; K itself keeps its name and value. A
feature-gated PE (PETRv2's SE layer) depends on the images and cannot be folded: the pass refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.analysis.petr_pe import PESite, find_pe
from onnxq.errors import OnnxqError
from onnxq.ir.graph import Namer, add_initializer
from onnxq.ir.linear import fold_input_addend
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize
from onnxq.stats.calib_data import CalibrationSet


@dataclass(frozen=True)
class PeFold(GraphPass):
    name: ClassVar[str] = "pe_fold"
    kind: ClassVar[Kind] = Kind.EXACT

    rig: str = ""        # .npy/.npz holding the PE source input for the deployment rig; "" = first calibration sample
    pe_input: str = ""   # the graph input the PE comes from, if the recognition is ambiguous
    tolerance: float = option(1e-6, low=0.0)  # calibration samples must match the rig to this relative difference

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        site = find_pe(model, self.pe_input or None)
        if site.gated:
            raise OnnxqError(f"pe_fold: the position embedding is multiplied by a gate computed from the image features "
                             f"(node '{site.gate.name}', PETRv2's feature-guided PE), so it is not constant for a fixed "
                             "rig and cannot be folded")
        if not site.key_projections:
            raise OnnxqError("pe_fold: the PE is added to the image features, but no key projection (MatMul by a "
                             "constant weight) reads the sum")
        source = self._source_value(site, ctx)
        pe_values = _evaluate(model, [a.pe for a in site.adds], site.source, source)
        graph, namer = model.graph, Namer(model.graph)
        folded, bias_absmax = 0, 0.0
        for add_site, pe in zip(site.adds, pe_values):
            for proj in add_site.key_projections:
                c = fold_input_addend(graph, namer, proj, add_site.memory, pe, tag="pe_folded")
                bias_absmax = max(bias_absmax, float(np.abs(c).max()))
                folded += 1
            if add_site.other_readers:  # keep memory + pe for them, the PE now a constant
                pe_const = add_initializer(graph, namer, f"{add_site.pe.name}_folded", pe)
                add_site.add.replace_input_with(add_site.pe_index, pe_const)
        RemoveUnusedNodesPass()(model)  # the PE subgraph is dead now; drop it to see whether the input is
        removed = None
        if not site.source.uses():
            graph.inputs.remove(site.source)
            removed = site.source.name
            if ctx.calibration is not None:
                ctx.calibration = _without_input(ctx.calibration, removed)
        summary = {"form": site.form, "pe_type": site.pe_type or "input", "key_projections_folded": folded,
                   "adds": len(site.adds), "pe_absmax": round(max(float(np.abs(p).max()) for p in pe_values), 3),
                   "folded_bias_absmax": round(bias_absmax, 3), "rig_from": self.rig or "first calibration sample"}
        if removed:
            summary["input_removed"] = removed
        return summary

    def _source_value(self, site: PESite, ctx: PassContext) -> np.ndarray:
        """The value of the PE's source input for the fixed rig; checks the calibration samples share it."""
        name = site.source.name
        what = "camera matrices" if site.form == "in_graph" else "position embedding"
        expected = tuple(d if isinstance(d, int) else None for d in site.source.shape) if site.source.shape else None
        value = None
        if self.rig:
            value = _read_rig(self.rig, name)
            if expected is not None and value.ndim == len(expected) - 1:
                value = value[None]
            if expected is not None and (value.ndim != len(expected)
                                         or any(e is not None and e != g for e, g in zip(expected, value.shape))):
                raise OnnxqError(f"pe_fold: {self.rig} holds {name} of shape {value.shape}; the model's input "
                                 f"'{name}' has shape {list(site.source.shape)}")
        if ctx.calibration is not None:
            for i, sample in enumerate(_samples(ctx.calibration, name)):
                if value is None:
                    value = sample[None]
                    continue
                ref = value[0]
                diff = float(np.abs(sample.astype(np.float64) - ref).max())
                if sample.shape != ref.shape or diff > self.tolerance * max(float(np.abs(ref).max()), 1e-30):
                    origin = self.rig or "calibration sample 0"
                    raise OnnxqError(f"pe_fold: calibration sample {i} has different {what} ('{name}') than {origin} "
                                     f"(max |difference| {diff:.3g}): the PE is constant only for one fixed camera rig; "
                                     "calibrate with data from the deployment rig (and give it with the `rig` option)")
        if value is None:
            raise OnnxqError(f"pe_fold needs the camera rig: give the `rig` option (.npy/.npz with '{name}') or "
                             "calibration data (--calib)")
        return np.ascontiguousarray(value.astype(site.source.dtype.numpy() if site.source.dtype else np.float32))


def _read_rig(path: str, name: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise OnnxqError(f"pe_fold: rig file {path} not found")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                if name in archive.files:
                    return archive[name]
                if len(archive.files) == 1:
                    return archive[archive.files[0]]
                raise OnnxqError(f"pe_fold: {path} holds {archive.files}, none named '{name}'")
        return np.load(p, allow_pickle=False)
    except OnnxqError:
        raise
    except Exception as exc:
        raise OnnxqError(f"pe_fold: cannot read {path} ({str(exc).splitlines()[0]})") from None


def _samples(data: CalibrationSet, name: str):
    for feed in data:
        batch = np.asarray(feed[name])
        yield from batch


def _evaluate(model: ir.Model, values: list[ir.Value], source: ir.Value, source_value: np.ndarray) -> list[np.ndarray]:
    """The tensors `values` (which depend on `source` only), computed by ONNX Runtime."""
    from onnxq.stats.calib_data import model_inputs
    from onnxq.stats.observers import BatchValues
    from onnxq.stats.service import observe

    feed = {}
    for spec in model_inputs(model):
        if spec.name == source.name:
            feed[spec.name] = source_value
        else:  # the PE does not depend on the other inputs, but ONNX Runtime wants them all
            feed[spec.name] = np.zeros([d if d is not None else 1 for d in spec.dims], dtype=spec.dtype)
    computed = BatchValues([v.name for v in values])
    observe(model, [feed], computed, desc="pe_fold: position embedding", show_progress=False)
    return [np.asarray(computed.result[0][v.name]) for v in values]


def _without_input(data: CalibrationSet, name: str) -> CalibrationSet:
    """The calibration batches without input `name` (removed from the model)."""
    return CalibrationSet(lambda: ({k: v for k, v in feed.items() if k != name} for feed in data),
                          data.num_batches, data.num_samples)
