"""Calibration data: every format users bring, validated against the model before any run.

Accepted sources (the formats of ModelOpt's `--calibration_data` and ONNX Runtime's readers):
- an .npz file: one array per model input, keyed by input name, samples stacked on axis 0;
- an .npy file: the same for a model with a single input;
- a folder of such files (read one file at a time, in name order);
- a dict {input_name: array} with samples stacked on axis 0;
- any iterable of {input_name: array} feeds, each one batch as the model takes it, or an object
  with ONNX Runtime's `CalibrationDataReader.get_next()`.

Stacked samples are cut into batches the model accepts: its own batch size when dimension 0 is
fixed, `batch_size` when it is dynamic. Calibration walks the data more than once (range, then
histogram), so one-shot iterables are read once into memory; inputs are small next to activations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """What the model declares for one input: name, element type, and dims (None where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims else None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name}: {self.dtype}[{dims}]"


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializers that double as inputs are optional, so skipped)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        try:
            dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        except TypeError:  # an element type numpy has no counterpart for
            raise OnnxqError(f"model input '{value.name}' has element type {value.dtype}, which calibration "
                             "arrays cannot hold") from None
        # a negative dimension (-1, as some exporters write for "any") is as free as a symbolic one
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape) if value.shape is not None else ()
        specs.append(InputSpec(value.name, np.dtype(dtype), dims))
    return specs


class CalibrationSet:
    """Validated calibration batches for one model; iterate as often as needed.

    `padding_mask` names the input whose zeros mark padded sequence positions (a Hugging Face
    `attention_mask`); statistics leave those positions out (see onnxq.stats.service.real_rows)."""

    def __init__(self, make_batches: Callable[[], Iterator[Feed]], num_batches: int, num_samples: int,
                 padding_mask: str | None = None, left_out: int = 0):
        self._make_batches = make_batches
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.padding_mask = padding_mask
        self.left_out = left_out  # samples past the last whole batch

    def __iter__(self) -> Iterator[Feed]:
        return self._make_batches()

    def __len__(self) -> int:
        return self.num_batches

    def left_out_message(self, what: str) -> str | None:
        """A warning line when samples past the last whole batch are left out (None when none are)."""
        if not self.left_out:
            return None
        total, size = self.num_samples + self.left_out, self.num_samples // max(self.num_batches, 1)
        return (f"{what}: {total} samples do not split into batches of {size}: the last {self.left_out} are left out "
                f"(a batch size that divides {total} uses all)")

    def first(self) -> Feed:
        return next(iter(self))


def float_input_types(model: ir.Model) -> dict[str, np.dtype]:
    return {s.name: s.dtype for s in model_inputs(model) if np.issubdtype(s.dtype, np.floating)}


def with_float_types(feed: Feed, types: dict[str, np.dtype]) -> Feed:
    """`feed` with each float array cast to the float type `types` names for its input: the same samples
    fed to an FP16 model (--high-precision fp16) of the FP32 model they were checked against."""
    return {k: v.astype(types[k]) if k in types and v.dtype != types[k] and np.issubdtype(v.dtype, np.floating)
            else v for k, v in feed.items()}


def in_input_types(data: CalibrationSet, model: ir.Model) -> CalibrationSet:
    """`data` fed in `model`'s float input types (with_float_types on every batch)."""
    types = float_input_types(model)
    return CalibrationSet(lambda: (with_float_types(feed, types) for feed in data), data.num_batches,
                          data.num_samples, data.padding_mask, data.left_out)


def load_calibration(source: Any, model: ir.Model, *, batch_size: int = 1, limit: int | None = None,
                     padding_mask: str | None = "auto") -> CalibrationSet:
    """Read `source` (see module doc), check it against `model`'s inputs, and batch it.

    `padding_mask`: the input whose zeros mark padding ("auto": an integer or bool input named
    attention_mask of rank 2, if the model has one; None: every position counts)."""
    specs = model_inputs(model)
    if isinstance(source, CalibrationSet):
        return source
    for name, value in (("batch size", batch_size), ("sample limit", limit)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise OnnxqError(f"{name} must be a positive integer, not {value!r}")
    if not specs:
        raise OnnxqError("the model takes no inputs, so there is nothing to feed it calibration data through")
    if isinstance(source, (str, os.PathLike)):
        data = _from_stacked_files(_files_of(Path(source), specs), specs, batch_size, limit)
    elif isinstance(source, Mapping):
        data = _from_stacked_files([("<dict>", lambda: dict(source))], specs, batch_size, limit)
    else:
        if hasattr(source, "get_next"):
            source = iter(source.get_next, None)
        if not isinstance(source, Iterable):
            raise OnnxqError(f"calibration data of type {type(source).__name__} is not supported: give an .npz/.npy "
                             "file, a folder of them, a dict of arrays, or an iterable of {input_name: array} feeds")
        data = _from_feeds(source, specs, limit)
    data.padding_mask = _padding_input(specs, padding_mask)
    if data.padding_mask and not any(np.any(feed[data.padding_mask]) for feed in data):
        raise OnnxqError(f"every calibration position is padding ('{data.padding_mask}' is 0 everywhere), so no "
                         "statistic would see data: fix the mask, or pass --padding-mask none")
    return data


def _padding_input(specs: list[InputSpec], wanted: str | None) -> str | None:
    if wanted is None:
        return None
    if wanted == "auto":
        found = [s for s in specs if s.name == "attention_mask" and _is_mask_like(s)]
        return found[0].name if found else None
    spec = next((s for s in specs if s.name == wanted), None)
    if spec is None or not _is_mask_like(spec):
        # a float mask is refused: it is often additive (0 = keep, -inf = padding), the opposite meaning
        raise OnnxqError(f"padding mask '{wanted}' is not a rank-2 integer or bool model input with 1 for real "
                         f"positions and 0 for padding (inputs: {[s.describe() for s in specs]})")
    return wanted


def _is_mask_like(spec: InputSpec) -> bool:
    return len(spec.dims) == 2 and (np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_)


def _files_of(path: Path, specs: list[InputSpec]) -> list[tuple[str, Callable[[], dict]]]:
    if not path.exists():
        raise OnnxqError(f"{path}: calibration data not found")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise OnnxqError(f"{path}: folder holds no .npz or .npy files")
    else:
        files = [path]
    return [(str(f), lambda f=f: _read_array_file(f, specs)) for f in files]


def _read_array_file(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise OnnxqError(f"{path}: a .npy file can only feed a single-input model; this one has inputs "
                                 f"{[s.name for s in specs]}: use an .npz keyed by input name")
            return {specs[0].name: np.load(path, allow_pickle=False)}
    except OnnxqError:
        raise
    except Exception as exc:
        raise OnnxqError(f"{path}: cannot read calibration arrays ({str(exc).splitlines()[0]})") from None
    raise OnnxqError(f"{path}: calibration files must be .npz or .npy")


def _from_stacked_files(files, specs, batch_size, limit) -> CalibrationSet:
    """Stacked-sample sources: check each file's arrays, then cut them into model-sized batches."""
    counts = []
    for label, read in files:
        arrays = read()
        counts.append(_check_stacked(label, arrays, specs))
    total = sum(counts)
    if limit is not None:
        total = min(total, limit)
    if total == 0:
        raise OnnxqError("calibration data is empty (0 samples)")
    step = specs[0].fixed_batch or batch_size if specs else batch_size
    usable = total - total % step
    if usable == 0:
        why = "the model's fixed batch size" if specs and specs[0].fixed_batch else "the batch size asked for"
        raise OnnxqError(f"calibration data has {total} samples, fewer than {why} ({step}): give more samples "
                         "or a smaller batch")

    def batches() -> Iterator[Feed]:
        left = usable
        for _, read in files:
            arrays = read()
            n = len(next(iter(arrays.values())))
            for start in range(0, n - step + 1, step):
                if left <= 0:
                    return
                yield {k: np.ascontiguousarray(v[start:start + step]) for k, v in arrays.items()}
                left -= step

    return CalibrationSet(batches, usable // step, usable, left_out=total - usable)


def _check_stacked(label: str, arrays: Mapping[str, np.ndarray], specs: list[InputSpec]) -> int:
    _check_names(label, arrays, specs)
    counts = {name: len(np.asarray(a)) if np.ndim(a) else 0 for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise OnnxqError(f"{label}: inputs hold different numbers of samples {counts}")
    for spec in specs:
        _check_array(label, np.asarray(arrays[spec.name]), spec, batch_free=True)
    return next(iter(counts.values()))


def _from_feeds(feeds: Iterable[Mapping[str, Any]], specs, limit) -> CalibrationSet:
    batches: list[Feed] = []
    samples = 0
    for i, feed in enumerate(feeds):
        if limit is not None and samples >= limit:
            break
        if not isinstance(feed, Mapping):
            raise OnnxqError(f"calibration feed #{i} is a {type(feed).__name__}, expected a dict {{input_name: array}}")
        feed = {k: np.asarray(v) for k, v in feed.items()}
        _check_names(f"calibration feed #{i}", feed, specs)
        for spec in specs:
            _check_array(f"calibration feed #{i}", feed[spec.name], spec, batch_free=False)
        batches.append(feed)
        samples += len(feed[specs[0].name]) if specs and feed[specs[0].name].ndim else 1
    if not batches:
        raise OnnxqError("calibration data is empty (the iterable yielded no feeds)")
    return CalibrationSet(lambda: iter(batches), len(batches), samples)


def _check_names(label: str, arrays: Mapping[str, Any], specs: list[InputSpec]) -> None:
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in arrays]
    extra = [n for n in arrays if n not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks model input(s) {missing}")
        if extra:
            parts.append(f"has {extra}, which the model does not take")
        raise OnnxqError(f"{label}: calibration data {' and '.join(parts)} (model inputs: {wanted})")


def _check_array(label: str, array: np.ndarray, spec: InputSpec, *, batch_free: bool) -> None:
    where = f"{label}: input '{spec.name}'"
    if array.dtype != spec.dtype:
        raise OnnxqError(f"{where} has dtype {array.dtype}, the model expects {spec.dtype} ({spec.describe()})")
    if spec.dims and array.ndim != len(spec.dims):
        raise OnnxqError(f"{where} has shape {array.shape} (rank {array.ndim}); the model expects rank "
                         f"{len(spec.dims)} ({spec.describe()}), samples stacked on axis 0")
    for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
        if want is None or (axis == 0 and batch_free):
            continue
        if got != want:
            raise OnnxqError(f"{where} has shape {array.shape}; the model expects {spec.describe()}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise OnnxqError(f"{where} contains NaN or infinite values")
