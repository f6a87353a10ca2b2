"""Float weights kept on disk while a large model is quantized, read back only when something needs them.

A pass that rewrites a weight (fold_norm, rotate, smooth, ...) leaves the new array in memory, and the
quantize step replaces each float weight with its integers only as it reaches it; GPTQ's snapshot of
the float model holds them all until its last Hessian group. For a model of P parameters that is
4·P bytes held for most of the run: the part of peak memory that grows with depth.

While a run is `activated`, every weight a pass writes through onnxq.ir.graph's helpers goes
straight to a scratch file of its own (`place`; the file goes when the last tensor reading it does), and after every pass `absorb` catches any other float weight
held in memory. In its place the model gets an `OnDemandTensor`, which reads its bytes from the file
each time it is asked and keeps nothing: resident memory holds only the weights in use (a segment's
session, the weight being rounded), not all a pass has rewritten. Weights still in the model's own external
file become on-demand tensors where they are (no copy), because onnx_ir's external tensors keep
their file mapped once read, and a mapped page counts as resident. Repeated reads come from the
operating system's page cache. `restore` gives the model back its usual tensors before it is
returned or saved, so nothing outside the run sees the scratch file.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

# What is moved: float types numpy holds natively (sub-byte and exotic types stay as they are).
SPILLED_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
_ACTIVE: contextvars.ContextVar[WeightSpill | None] = contextvars.ContextVar("onnxq_weight_spill", default=None)


def place_if_spilling(value: ir.Value) -> None:
    """Move the weight just written to `value` to disk when the current run keeps its weights there."""
    spill = _ACTIVE.get()
    if spill is not None:
        spill.place(value)


class OnDemandTensor(ir.ExternalTensor):
    """An external tensor read from its file on every numpy()/tobytes() call and never cached, so it
    costs no resident memory between reads. `scratch`: its file is the spill's, not the model's."""

    __slots__ = ("scratch",)

    def __init__(self, *args, scratch: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.scratch = scratch

    def numpy(self) -> np.ndarray:
        dtype = self.dtype.numpy()
        with open(self.path, "rb") as file:
            file.seek(self.offset or 0)
            array = np.fromfile(file, dtype=dtype, count=self.nbytes // dtype.itemsize)
        return array.reshape(self.shape.numpy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(self.offset or 0)
            return file.read(self.nbytes)

    def release(self) -> None:
        """Nothing is held between reads."""


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class WeightSpill:
    """A scratch folder the float weights of one model are moved to, a file per weight; `close` deletes it."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self.folder = Path(tempfile.mkdtemp(prefix="onnxq-spill-"))
        self.spilled_bytes = 0
        self._files = 0

    def absorb(self, model: ir.Model) -> int:
        """Move `model`'s float weights of at least `min_bytes` that are held in memory (or mapped from
        its own file) out of memory; return how many bytes were written to the scratch file."""
        return sum(self.place(value) for value in model.graph.initializers.values())

    def place(self, value: ir.Value) -> int:
        """Move `value`'s weight out of memory if it is a float one of at least `min_bytes`; return how
        many bytes were written to the scratch file."""
        tensor = value.const_value
        if (tensor is None or isinstance(tensor, OnDemandTensor) or tensor.dtype not in SPILLED_TYPES
                or tensor.nbytes < self.min_bytes):
            return 0
        shape = ir.Shape(tensor.shape.numpy())
        if isinstance(tensor, ir.ExternalTensor):  # already on disk: read it where it is
            value.const_value = OnDemandTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                               shape=shape, name=tensor.name, base_dir=tensor.base_dir, scratch=False)
            tensor.release()
            return 0
        array = np.ascontiguousarray(tensor.numpy(), dtype=tensor.dtype.numpy())
        self._files += 1
        location = f"{self._files}.bin"
        array.tofile(self.folder / location)
        stored = OnDemandTensor(location, 0, array.nbytes, tensor.dtype, shape=shape, name=tensor.name,
                                base_dir=self.folder, scratch=True)
        # a weight a later pass replaces leaves the disk with its last reader
        weakref.finalize(stored, _remove, self.folder / location)
        value.const_value = stored
        self.spilled_bytes += array.nbytes
        return array.nbytes

    @contextlib.contextmanager
    def activated(self) -> Iterator[WeightSpill]:
        """Within this block, weights written through onnxq.ir.graph's helpers go to disk at once."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def restore(self, model: ir.Model) -> None:
        """Give `model` its usual tensors back: scratch weights read into memory, weights of its own
        file plain (lazily read) external tensors again."""
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, OnDemandTensor):
                continue
            if tensor.scratch:
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
            else:
                value.const_value = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                                      shape=tensor.shape, name=tensor.name, base_dir=tensor.base_dir)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> WeightSpill:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
