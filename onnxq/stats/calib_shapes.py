"""Calibration shapes (ModelOpt's --calibration_shapes): the exact shape of every calibration batch.

`--calibration-shapes input_ids:8x128,attention_mask:8x128` says each batch holds 8 samples (the
first dimension, the batch size) of those dims. It fixes what a model with dynamic dims is calibrated
on, and is checked before any work: each input named once, a dimension the model fixes matches, every
input given the same batch size, every batch of the data exactly that shape. The quantized model keeps
its dynamic dims.
"""

from __future__ import annotations

import re

from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.stats.calib_data import CalibrationSet, InputSpec

Shapes = dict[str, tuple[int, ...]]
_ENTRY = re.compile(r"^(.+):(\d+(?:[xX]\d+)*)$")  # the last ':' ends the name (TensorFlow names hold one)


def parse_shapes(text: str) -> Shapes:
    """'a:1x3x224x224,b:1x8' → {'a': (1, 3, 224, 224), 'b': (1, 8)}. A name may hold ':' but not ','."""
    shapes: Shapes = {}
    for entry in (part.strip() for part in text.split(",")):
        match = _ENTRY.match(entry)
        if not match:
            raise OnnxqValueError(f"calibration shapes: '{entry}' is not NAME:D1xD2x... (e.g. input:8x3x224x224)")
        name, dims = match.group(1), tuple(int(d) for d in re.split("[xX]", match.group(2)))
        if name in shapes:
            raise OnnxqValueError(f"calibration shapes: input '{name}' is named twice")
        if 0 in dims:
            raise OnnxqValueError(f"calibration shapes: '{entry}' has a zero dimension")
        shapes[name] = dims
    return shapes


def shapes_from_mapping(shapes) -> Shapes:
    """The Python form, {name: (d1, d2, ...)}, checked: positive integers only."""
    out: Shapes = {}
    for name, dims in shapes.items():
        if not isinstance(name, str) or isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
            raise OnnxqTypeError(f"calibration_shapes: expected {{input name: (d1, d2, ...)}}, got {name!r}: {dims!r}")
        dims = tuple(dims)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise OnnxqValueError(f"calibration_shapes: '{name}': {dims!r} is not a tuple of positive integers")
        out[name] = dims
    return out


def batch_size_of(shapes: Shapes, specs: list[InputSpec]) -> int:
    """The batch size the shapes give, after checking them against the model's inputs."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise OnnxqError(f"calibration shapes: the model has no input {unknown} (its inputs: {sorted(by_name)})")
    missing = sorted(set(by_name) - set(shapes))
    if missing:
        raise OnnxqError(f"calibration shapes: no shape for input(s) {missing}; give one for every input")
    for name, dims in shapes.items():
        spec = by_name[name]
        if not spec.dims:  # rank unknown (or a scalar): nothing to check the shape against
            continue
        if len(dims) != len(spec.dims) or any(d is not None and d != g for d, g in zip(spec.dims, dims)):
            raise OnnxqError(f"calibration shapes: {name}:{'x'.join(map(str, dims))} does not fit the model's "
                             f"{spec.describe()}")
    batches = {dims[0] for dims in shapes.values()}
    if len(batches) > 1:
        raise OnnxqError(f"calibration shapes: the inputs' first dimensions (the batch size) differ: {sorted(batches)}")
    return batches.pop()


def check_batches(data: CalibrationSet, shapes: Shapes) -> None:
    """Every calibration batch has exactly the given shapes (the first one that does not is named)."""
    for index, feed in enumerate(data):
        for name, dims in shapes.items():
            if tuple(feed[name].shape) != dims:
                raise OnnxqError(f"calibration batch #{index}: input '{name}' has shape {list(feed[name].shape)}, "
                                 f"--calibration-shapes says {list(dims)}")
