"""Float weights kept on disk while a large model is quantized, read back only when something needs them.

A pass that rewrites a weight (fold_norm, rotate, smooth, ...) leaves the new array in memory, and the
quantize step replaces each float weight with its integers only as it reaches it; GPTQ's snapshot of
the float model holds them all until its last Hessian group. For a model of P parameters that is
4·P bytes held for most of the run: the part of peak memory that grows with depth.

While a run is `spilling`, every weight a pass writes through onnxq.ir.graph's helpers goes
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
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

# What is moved: float types numpy holds natively (sub-byte and exotic types stay as they are).
SPILLED_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
FOLDER_PREFIX = "onnxq-spill-"  # then the owning process id and a dash
_ACTIVE: contextvars.ContextVar[WeightSpill | None] = contextvars.ContextVar("onnxq_weight_spill", default=None)
logger = logging.getLogger("onnxq")


@contextlib.contextmanager
def spilling(spill: WeightSpill | None) -> Iterator[None]:
    """Within this block, weights written through onnxq.ir.graph's helpers go to `spill`'s disk at once
    (None: they stay in memory, also inside a run that spills)."""
    token = _ACTIVE.set(spill)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


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
        self._check_containment()
        dtype = self.dtype.numpy()
        with open(self.path, "rb") as file:
            file.seek(self.offset or 0)
            array = np.fromfile(file, dtype=dtype, count=self.nbytes // dtype.itemsize)
        return array.reshape(self.shape.numpy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        self._check_containment()
        with open(self.path, "rb") as file:
            file.seek(self.offset or 0)
            return file.read(self.nbytes)

    def release(self) -> None:
        """Nothing is held between reads."""

    def _check_containment(self) -> None:
        # the same guard onnx_ir's own reads apply: the file must lie inside base_dir (load_model has
        # checked the model's references already; this keeps a hand-built tensor honest too)
        check = getattr(super(), "_check_path_containment", None)
        if check is not None:
            check()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _remove_orphans() -> None:
    """Delete the scratch folders of runs whose process has died (killed before it could clean up)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name[len(FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_memory_filesystem(path: Path) -> bool:
    """Whether `path` lies on tmpfs/ramfs (Linux; False where /proc/mounts cannot tell)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    resolved = str(path.resolve())
    under = [(len(point), kind) for point, kind in mounts
             if resolved == point or resolved.startswith(point.rstrip("/") + "/")]
    return bool(under) and max(under)[1] in ("tmpfs", "ramfs")


class WeightSpill:
    """A scratch folder the float weights of one model are moved to, a file per weight; `close` deletes it."""

    def __init__(self, min_bytes: int):
        _remove_orphans()
        self.min_bytes = min_bytes
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))  # in TMPDIR
        self.spilled_bytes = 0
        self.failed = False
        self._files = 0
        if _in_memory_filesystem(self.folder):
            logger.warning(f"{self.folder.parent} is held in memory (tmpfs): keeping weights there saves no memory; "
                           "set TMPDIR to a folder on disk")

    def absorb(self, model: ir.Model) -> int:
        """Move `model`'s float weights of at least `min_bytes` that are held in memory (or mapped from
        its own file) out of memory; return how many bytes were written to the scratch file."""
        return sum(self.place(value) for value in model.graph.initializers.values())

    def place(self, value: ir.Value) -> int:
        """Move `value`'s weight out of memory if it is a float one of at least `min_bytes`; return how
        many bytes were written to the scratch file."""
        tensor = value.const_value
        if (self.failed or tensor is None or isinstance(tensor, OnDemandTensor) or tensor.dtype not in SPILLED_TYPES
                or tensor.nbytes < self.min_bytes):
            return 0
        shape = ir.Shape(tensor.shape.numpy())
        if isinstance(tensor, ir.ExternalTensor):  # already on disk: read it where it is
            value.const_value = OnDemandTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                               shape=shape, name=tensor.name, base_dir=tensor.base_dir, scratch=False)
            with contextlib.suppress(BufferError):  # a caller's view of the mapping keeps it open
                tensor.release()
            return 0
        array = np.ascontiguousarray(tensor.numpy(), dtype=tensor.dtype.numpy())
        self._files += 1
        location = f"{self._files}.bin"
        try:
            array.tofile(self.folder / location)
        except OSError as exc:  # a full disk: the run goes on with its weights in memory
            (self.folder / location).unlink(missing_ok=True)
            self.failed = True
            logger.warning(f"cannot keep weights on disk in {self.folder} ({exc.strerror}); holding them in memory "
                           "from here on")
            return 0
        stored = OnDemandTensor(location, 0, array.nbytes, tensor.dtype, shape=shape, name=tensor.name,
                                base_dir=self.folder, scratch=True)
        # a weight a later pass replaces leaves the disk with its last reader
        weakref.finalize(stored, _remove, self.folder / location)
        value.const_value = stored
        self.spilled_bytes += array.nbytes
        return array.nbytes

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
