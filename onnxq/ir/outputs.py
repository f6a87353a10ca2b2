"""Writing output files safely: checked before any work, written atomically, never over an input.

Every file onnxq writes (a model, its external-data file, a JSON report, an engine) goes through
here. Before any work, `check_outputs` refuses an output that is one of the files the run reads
(compared by device and inode, so symlinks, hard links and `..` cannot hide it), two outputs that are
the same file, and an output whose folder is missing or not writable (probed by creating a file,
which also catches read-only file systems and holds for root). `write_atomically` then writes to a
hidden temporary file beside the target and renames it into place: a failure, a full disk or a
signal never leaves a partial output. Temporary files are named `.NAME.onnxq-PID-RANDOM.tmp` and
created with mode 0666 minus the umask, like any file a program creates; one left behind by a
process that was killed outright (SIGKILL) is removed the next time onnxq writes NAME.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from onnxq.errors import OnnxqError

_TEMP_RE = re.compile(r"\.onnxq-(\d+)-[0-9a-f]+\.tmp")


def temp_path(path: Path) -> Path:
    """A fresh hidden temporary name beside `path`, unique to this process and call."""
    return path.parent / f".{path.name}.onnxq-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def create_temp(path: Path) -> Path:
    """Create (exclusively) an empty temporary file beside `path`; the umask decides its mode."""
    while True:
        tmp = temp_path(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files for `path` whose writing process no longer exists."""
    prefix = f".{path.name}"
    for name in glob.glob(glob.escape(str(path.parent / prefix)) + ".onnxq-*.tmp*"):
        match = _TEMP_RE.match(Path(name).name[len(prefix):])
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(name)
            except OSError:
                pass


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], *,
                     extra_suffixes: Sequence[str] = ()) -> Path:
    """Call `write(tmp)` and rename `tmp` onto `path`; on any failure remove what was written.

    `extra_suffixes`: sidecar files `write` may create as `tmp + suffix` (cleaned up on failure; the
    caller moves them into place). OS errors (full disk, permissions) become one-line OnnxqErrors."""
    path = Path(path)
    remove_stale_temps(path)
    try:
        tmp = create_temp(path)
    except OSError as exc:
        raise OnnxqError(f"{path}: cannot write ({_reason(exc)})") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp, extra_suffixes)
        raise OnnxqError(f"{path}: cannot write ({_reason(exc)}); nothing was written") from None
    except BaseException:
        _remove(tmp, extra_suffixes)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_outputs(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                  reads: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or cannot be written.

    `outputs`: (what, path) pairs such as ("--report", "r.json"); None paths are skipped. `reads`:
    (what, path) for every file the run reads, e.g. from `files_read_by_model`."""
    read_files = [(what, Path(r)) for what, r in reads if Path(r).exists()]
    seen: list[tuple[str, Path]] = []
    for what, out in outputs:
        if out is None:
            continue
        out = Path(out)
        for read_what, read in read_files:
            if same_file(out, read):
                raise OnnxqError(f"{out}: {what} is {read_what} ({read}), which this run reads; "
                                 "choose another output path")
        for other_what, other in seen:
            if same_file(out, other):
                raise OnnxqError(f"{out}: {what} and {other_what} name the same file; choose different paths")
        seen.append((what, out))
        check_writable(out, what)


def check_writable(path: Path, what: str = "output") -> None:
    """A one-line error unless a file can be created at `path` (replacing a regular file is fine)."""
    if path.is_dir():
        raise OnnxqError(f"{path}: {what} is a folder; give a file path")
    parent = path.parent
    if not parent.exists():
        raise OnnxqError(f"{parent}: folder of {what} does not exist")
    if not parent.is_dir():
        raise OnnxqError(f"{parent}: is not a folder, so {what} {path} cannot be created in it")
    try:
        os.unlink(create_temp(path))
    except OSError as exc:
        raise OnnxqError(f"{path}: {what} cannot be written ({_reason(exc)})") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` are one file: same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def files_read_by_model(path: str | os.PathLike, what: str = "the input model") -> list[tuple[str, Path]]:
    """(what, path) for the model file and each external-data file its tensors name (only the model
    when it cannot be parsed: loading it reports that problem)."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import _get_all_tensors

    path = Path(path)
    if not path.is_file():
        return []
    files = {path: what}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):  # not a model: load_model says so in one line
        return [(what, path)]
    for tensor in _get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                files.setdefault(path.parent / entry.value, f"the external-data file of {what}")
    return [(w, p) for p, w in files.items()]


def calibration_files(source, what: str = "the calibration data") -> list[tuple[str, Path]]:
    """(what, path) for the files of a calibration source on disk (a folder's arrays for a folder)."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    path = Path(source)
    if path.is_dir():
        return [(what, p) for p in path.iterdir() if p.suffix in (".npz", ".npy")]
    return [(what, path)]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own writes in progress (another thread) are not stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove(tmp: Path, suffixes: Sequence[str]) -> None:
    for name in (tmp, *(tmp.with_name(tmp.name + s) for s in suffixes)):
        try:
            name.unlink()
        except OSError:
            pass


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if exc.errno == errno.EFBIG:
        return "file too large for the file system or the process's size limit"
    return exc.strerror or type(exc).__name__
