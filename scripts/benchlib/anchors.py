"""The quantizers our benchmarks compare against ("anchors"), run the way their users run them.

- ort_quantize(): ONNX Runtime quantize_static, QDQ format. Default = what TensorRT accepts:
  symmetric int8 activations and weights, MinMax calibration, per-tensor weights. Options give
  per-channel weights, Entropy/Percentile calibration, and the x86-CPU flavour (asymmetric uint8
  activations, int8 weights), which is what ORT's docs recommend for VNNI CPUs.
- modelopt_quantize(): NVIDIA ModelOpt `python -m modelopt.onnx.quantization --quantize_mode int8|fp8`,
  run on CPU in its own virtual environment (scripts/setup_modelopt.sh makes it).
- ort_smoothquant(): quantize_static with its SmoothQuant option, which runs Intel Neural
  Compressor 2.x; call it from the Python of ensure_inc()'s venv (scripts/setup_inc.sh makes it).

Both take the calibration set as {input name: array with samples stacked on axis 0} (the same
content as the .npz the onnxq CLI reads), never raise on a quantizer failure, and return an
AnchorResult with the output path, wall time and the error text when the quantizer crashed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchlib import REPO

MODELOPT_VENV = REPO / ".cache" / "modelopt-venv"
MODELOPT_SETUP = REPO / "scripts" / "setup_modelopt.sh"
INC_VENV = REPO / ".cache" / "inc-venv"
INC_SETUP = REPO / "scripts" / "setup_inc.sh"


@dataclass
class AnchorResult:
    name: str
    output: Path | None  # None when the quantizer failed
    seconds: float  # wall time of the quantizer call that made the output (pre-processing included)
    error: str | None = None  # last lines of the traceback / stderr when it failed
    log: str = ""  # captured output of a subprocess quantizer
    notes: list[str] = field(default_factory=list)  # fallbacks taken on the way

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- ONNX Runtime

def _calibration_reader(calib: dict[str, np.ndarray], batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds the stacked samples in batches; rewindable, as the ORT API allows."""

        def __init__(self):
            self.count = len(next(iter(calib.values())))
            self.start = 0

        def get_next(self):
            if self.start >= self.count:
                return None
            stop = self.start + batch_size
            feeds = {name: array[self.start:stop] for name, array in calib.items()}
            self.start = stop
            return feeds

        def rewind(self):
            self.start = 0

    return ArrayReader()


def _static_batch(model_path: Path) -> int | None:
    """The batch size the model's first input fixes, or None when it is dynamic."""
    import onnx

    dim = onnx.load(str(model_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def ort_quantize(
    model_path: str | os.PathLike,
    calib: dict[str, np.ndarray],
    output: str | os.PathLike,
    *,
    per_channel: bool = False,
    calibrate: str = "minmax",
    symmetric_activations: bool = True,
    preprocess: bool = True,
    nodes_to_exclude: Iterable[str] = (),
    op_types_to_quantize: Iterable[str] = (),
    extra_options: dict | None = None,
    batch_size: int = 16,
) -> AnchorResult:
    """ORT quantize_static to QDQ.

    symmetric_activations=True: QInt8 activations (zero point 0) and QInt8 symmetric weights,
    the TensorRT-compatible form. False: QUInt8 asymmetric activations + QInt8 weights,
    reduce_range off: ORT's own recommendation for x86 CPUs with VNNI.
    calibrate: 'minmax' | 'entropy' | 'percentile' | 'distribution'.
    preprocess: run onnxruntime.quantization.quant_pre_process first (ORT's documented flow:
    symbolic shape inference + basic graph optimisations such as Conv+BatchNormalization fusion).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model_path, output = Path(model_path).resolve(), Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile,
              "distribution": CalibrationMethod.Distribution}[calibrate.lower()]
    options = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
    options.update(extra_options or {})
    name = (f"ort-{'s8' if symmetric_activations else 'u8'}-{'pc' if per_channel else 'pt'}-{calibrate.lower()}"
            + ("" if preprocess else "-nopre"))
    batch = _static_batch(model_path) or batch_size
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ort-anchor-") as tmp, working_dir(tmp):
        # ORT's calibrator writes augmented models (and external-data files) into the working dir
        source = private_copy(model_path, Path(tmp))  # our copy, not ORT's work: outside the timing
        start = time.perf_counter()
        try:
            source = _pre_process(source, Path(tmp) / "preprocessed.onnx", notes) if preprocess else source
            quantize_static(
                str(source), str(output), _calibration_reader(calib, batch),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=method,
                nodes_to_exclude=list(nodes_to_exclude), op_types_to_quantize=list(op_types_to_quantize) or None,
                extra_options=options,
            )
        except Exception:
            return AnchorResult(name, None, time.perf_counter() - start, _tail(traceback.format_exc()), notes=notes)
    return AnchorResult(name, output, time.perf_counter() - start, notes=notes)


def ort_smoothquant(model_path, calib: dict[str, np.ndarray], output, *, per_channel: bool = False,
                    alpha: float = 0.5, batch_size: int = 16) -> AnchorResult:
    """quantize_static with SmoothQuant (neural-compressor), as documented: ORT's defaults first
    (scales folded into the preceding op); where INC's folding crashes, again with folding off
    (explicit Mul nodes), and the fallback is noted."""
    options = {"SmoothQuant": True, "SmoothQuantAlpha": alpha, "SmoothQuantFolding": True}
    result = ort_quantize(model_path, calib, output, per_channel=per_channel, extra_options=options,
                          batch_size=batch_size)
    if not result.ok:
        failure = result.error.strip().splitlines()[-1][:200]
        result = ort_quantize(model_path, calib, output, per_channel=per_channel, batch_size=batch_size,
                              extra_options={**options, "SmoothQuantFolding": False})
        result.notes.append(f"SmoothQuantFolding=True failed ({failure}); folding off")
    result.name += f"-smoothquant{alpha}"
    return result


def ensure_inc() -> Path:
    """Python of the neural-compressor venv, installing it first when missing (idempotent, ~70 s once)."""
    subprocess.run(["bash", str(INC_SETUP)], check=True, env={**os.environ, "PROJECT_PYTHON": sys.executable})
    return INC_VENV / "bin" / "python"


def private_copy(model_path: Path, folder: Path) -> Path:
    """A copy of the model (external data included) in `folder`, for a quantizer to read.

    Anchors must not touch the model the other rows read: ModelOpt's loader runs
    onnx.shape_inference.infer_shapes_path(onnx_path), which rewrites its input in place with
    value_info for every tensor, and ORT then picks other kernels for the same graph (MiniLM's
    calibration scales moved by 1e-6, enough to flip GPTQ's integer choices downstream)."""
    # Not onnxq.ir.modelio.save_model: this also runs in the neural-compressor venv, which has no onnxq.
    import onnx

    model = onnx.load(str(model_path))
    copy = folder / f"source_{model_path.name}"
    # weights go beside the graph below protobuf's 2 GiB ceiling (with 1 MiB left for the graph itself)
    onnx.save_model(model, str(copy), save_as_external_data=model.ByteSize() > 2**31 - 2**20,
                    location=f"{copy.name}.data")
    return copy


@contextlib.contextmanager
def working_dir(path):
    """Run the block in `path` (ORT's quantizer writes helper files into the working directory)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _pre_process(model_path: Path, out: Path, notes: list[str]) -> Path:
    """ORT's quant_pre_process (symbolic shape inference + basic optimisations, e.g. Conv+BN fusion)."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(model_path), str(out))
    except Exception as exc:
        if "Incomplete symbolic shape inference" not in str(exc):
            raise
        # ORT's documented remedy (quant_pre_process --auto_merge): conflicting symbolic dims,
        # e.g. BERT's position-embedding Slice gives Min(512, sequence) against sequence.
        quant_pre_process(str(model_path), str(out), auto_merge=True)
        notes.append("quant_pre_process: incomplete symbolic shape inference, redone with auto_merge=True")
    return out


# ----------------------------------------------------------------------------- NVIDIA ModelOpt

def ensure_modelopt() -> Path:
    """Python of the ModelOpt venv, installing it first when missing (idempotent, ~75 s once)."""
    subprocess.run(["bash", str(MODELOPT_SETUP)], check=True)
    return MODELOPT_VENV / "bin" / "python"


def modelopt_version() -> str:
    python = ensure_modelopt()
    return subprocess.run([str(python), "-c", "import modelopt; print(modelopt.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def modelopt_quantize(
    model_path: str | os.PathLike,
    calib: dict[str, np.ndarray],
    output: str | os.PathLike,
    *,
    calibration_method: str = "entropy",
    quantize_mode: str = "int8",
    extra_args: Iterable[str] = (),
    timeout_s: float = 3600,
) -> AnchorResult:
    """ModelOpt ONNX PTQ on CPU, high-precision parts kept in FP32.

    quantize_mode: 'int8' or 'fp8' (E4M3). calibration_method: 'entropy' (ModelOpt's default for
    both) or 'max'. ModelOpt quantizes activations per tensor, symmetric, and places Q/DQ for TensorRT.
    """
    model_path, output = Path(model_path).resolve(), Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    python = ensure_modelopt()
    name = f"modelopt-{quantize_mode}-{calibration_method}"
    with tempfile.TemporaryDirectory(prefix="modelopt-") as tmp:
        calib_file = Path(tmp) / "calib.npz"
        np.savez(calib_file, **calib)
        source = private_copy(model_path, Path(tmp))  # ModelOpt writes shape-inferred models over its input
        cmd = [str(python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(source),
               "--quantize_mode", quantize_mode, "--calibration_method", calibration_method,
               "--calibration_data_path", str(calib_file), "--calibration_eps", "cpu",
               "--high_precision_dtype", "fp32", "--output_path", str(output), *extra_args]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
        except subprocess.TimeoutExpired as exc:
            return AnchorResult(name, None, time.perf_counter() - start, f"timed out after {exc.timeout} s")
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not output.exists():
        return AnchorResult(name, None, seconds, _tail(log) or f"exit status {proc.returncode}", log)
    return AnchorResult(name, output, seconds, None, log)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


if __name__ == "__main__":  # tiny manual check, from scripts/: python -m benchlib.anchors model.onnx calib.npz out_dir
    model, calib_npz, out_dir = sys.argv[1:4]
    arrays = dict(np.load(calib_npz))
    for result in (ort_quantize(model, arrays, Path(out_dir) / "ort.onnx"),
                   modelopt_quantize(model, arrays, Path(out_dir) / "modelopt.onnx")):
        print(result.name, "ok" if result.ok else "FAILED", f"{result.seconds:.1f} s", result.error or result.output)
