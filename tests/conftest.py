import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest


def run(model, feed):
    """Run a ModelProto (or path) in ONNX Runtime on the CPU and return the outputs as a list.

    At ORT's basic optimization level: a quantized graph then computes exactly what its Q/DQ nodes say.
    The extended level fuses them into integer kernels whose results depend on the CPU (on AVX2 without
    VNNI, ORT's u8·s8 products saturate in 16 bits), which would make a test's numbers depend on the
    machine it runs on; the tests that check fusion read ORT's optimized graph instead."""
    source = model if isinstance(model, (str, Path)) else model.SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"]).run(None, feed)


def rel_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(a).max(), 1e-12))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.sum((out.astype(np.float64) - ref) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise)) if noise > 0 else float("inf")


def assert_lint_clean(model):
    """Every model the test suite produces is linted against the TensorRT rules."""
    from onnxq.ir.modelio import load_model
    from onnxq.quant.lint import lint

    failures = [(r.rule, r.violations[:3]) for r in lint(load_model(model)) if r.status == "FAIL"]
    assert not failures, failures


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small torch models: more threads only add synchronisation, which costs seconds on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(capsys, *argv):
    """Run the onnxq command line in-process: (exit status, stdout, stderr)."""
    from onnxq.cli.main import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def digest(path: Path) -> str | None:
    """SHA-256 of a file (a folder: of its files in order); None when nothing is there."""
    if path.is_dir():
        return "|".join(digest(p) or "" for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def temp_files(folder: Path) -> list[str]:
    """onnxq's temporary files left under `folder` (there should never be any)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".onnxq-" in p.name or ".tmp" in p.name)
