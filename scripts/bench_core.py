"""Benchmark of the core quantizer (not a test): onnxq against ONNX Runtime's quantize_static and
NVIDIA ModelOpt, on the same models and data, side by side in one run.

    python scripts/bench_core.py [--quick] [--out scripts/results/bench_core] [--models mobilenet_v2,minilm]
                                 [--only LABEL,LABEL]

FP8 rows (`--only 'onnxq (per-channel),onnxq FP8,ModelOpt INT8,ModelOpt FP8'` for the FP8 comparison):
onnxq's `--format fp8` and ModelOpt's `--quantize_mode fp8` with its default (entropy) and max
calibration. ONNX Runtime runs FP8 models at its basic optimization level (onnxq.runtime.session).

Models: MobileNetV2 (ImageNet weights; top-1/top-5 agreement with FP32 on crops of photos that
calibration never sees: the dev split, 300 crops of the 5 photos the CNN defaults were tuned on, and
the test split, 1012 crops of 23 photos nothing was tuned on, from the Debian packages
mate-backgrounds and plasma-workspace-wallpapers; 128 calibration crops of 6 other photos) and all-MiniLM-L6-v2 (Spearman on WordSim-353 and SimLex-999, mean
cosine to the FP32 sentence embeddings). Per quantizer: the task metric, quantization wall time,
the TensorRT lint verdict, and ONNX Runtime CPU latency at batch 1 (one thread, runs alternating
between the models in one process). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

import onnxq
from benchlib import anchors, only_filter
from benchlib.facts import lint_verdict
from benchlib.minilm_task import minilm_task
from onnxq.ir.modelio import load_model
from onnxq.runtime.session import latency_ms, session
from onnxq_models import images, minilm, mobilenet_v2
from onnxq_models.cache import cache_dir

SELECTED = [only_filter("")]  # --only


@dataclass
class Row:
    quantizer: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    lint: str = "-"
    latency_ms: float | None = None
    error: str | None = None
    notes: str = ""


def quantizers(fp32: Path, calib: dict[str, np.ndarray], out: Path) -> dict[str, Callable[[], tuple[Path, str]]]:
    """name → a function that quantizes and returns (path, notes)."""

    def run_onnxq(name: str, **kw):
        def go():
            path = out / f"{name}.onnx"
            onnxq.quantize(fp32, calib, output=path, show_progress=False, log=lambda *_: None, **kw)
            return path, f"recipe {load_model(path).metadata_props.get('onnxq.recipe')}"
        return go

    def run_anchor(fn, name: str, **kw):
        def go():
            result = fn(fp32, calib, out / f"{name}.onnx", **kw)
            if not result.ok:
                raise RuntimeError(result.error.strip().splitlines()[-1])
            return result.output, "; ".join(getattr(result, "notes", []) or [])
        return go

    # ORT's documented setting for transformers quantizes only the MatMuls: a row of its own where there are any
    matmul_only = ({"ORT quantize_static s8 per-channel, MatMul only": run_anchor(
        anchors.ort_quantize, "ort_s8_pc_matmul", per_channel=True, op_types_to_quantize=["MatMul"])}
        if any(node.op_type == "MatMul" for node in onnx.load(fp32, load_external_data=False).graph.node) else {})
    return {
        "onnxq (per-channel)": run_onnxq("onnxq_pc"),
        "onnxq (per-tensor)": run_onnxq("onnxq_pt", per_tensor=True),
        "onnxq --target ort-cpu": run_onnxq("onnxq_ortcpu", target="ort-cpu"),
        "ORT quantize_static s8 per-tensor": run_anchor(anchors.ort_quantize, "ort_s8_pt"),
        "ORT quantize_static s8 per-channel": run_anchor(anchors.ort_quantize, "ort_s8_pc", per_channel=True),
        **matmul_only,
        "ORT quantize_static u8s8 per-channel": run_anchor(anchors.ort_quantize, "ort_u8_pc", per_channel=True,
                                                           symmetric_activations=False),
        "ModelOpt INT8": run_anchor(anchors.modelopt_quantize, "modelopt"),
        "onnxq FP8 (per-channel)": run_onnxq("onnxq_fp8", format="fp8"),
        "ModelOpt FP8": run_anchor(anchors.modelopt_quantize, "modelopt_fp8", quantize_mode="fp8"),
        "ModelOpt FP8 (max)": run_anchor(anchors.modelopt_quantize, "modelopt_fp8_max", quantize_mode="fp8",
                                         calibration_method="max"),
    }


def benchmark(name: str, fp32: Path, calib: dict, evaluate: Callable[[Path], dict], feed: dict, out: Path) -> list[Row]:
    rows = [Row("FP32", evaluate(fp32), lint="-")]
    paths = {"FP32": fp32}
    for label, quantize in quantizers(fp32, calib, out).items():
        if not SELECTED[0](label):
            continue
        print(f"[{name}] {label} ...", flush=True)
        row = Row(label)
        start = time.perf_counter()
        try:
            path, row.notes = quantize()
        except Exception as exc:
            row.error = str(exc)[:300]
            rows.append(row)
            continue
        row.seconds = round(time.perf_counter() - start, 1)
        row.metrics = evaluate(path)
        row.lint = lint_verdict(load_model(path))["lint"]
        paths[label] = path
        rows.append(row)
    sessions = {label: session(path, threads=1) for label, path in paths.items()}
    times = latency_ms(sessions, feed, runs=60, warmup=5)
    for row in rows:
        row.latency_ms = round(times[row.quantizer], 2) if row.quantizer in times else None
    return rows


def mobilenet(out: Path, quick: bool) -> list[Row]:
    fp32 = mobilenet_v2.cached_onnx()
    calib = {"input": images.crops("calib", 32 if quick else 128)}
    # dev: the 5 photos the CNN defaults were tuned on; test: 23 photos nothing was tuned on
    splits = {"dev": images.crops("dev", 60 if quick else 300), "test": images.crops("test", 92 if quick else 1012)}
    reference = {name: _logits(fp32, crops) for name, crops in splits.items()}

    def evaluate(path):
        metrics = {}
        for name, crops in splits.items():
            logits, ref1 = _logits(path, crops), reference[name].argmax(1)
            top5 = np.argsort(-logits, axis=1)[:, :5]
            metrics[f"top1_agreement_{name}"] = float(np.mean(logits.argmax(1) == ref1))
            metrics[f"top5_agreement_{name}"] = float(np.mean([r in t for r, t in zip(ref1, top5)]))
        return metrics

    return benchmark("MobileNetV2", fp32, calib, evaluate, {"input": splits["dev"][:1]}, out)


def _logits(path, crops: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Logits of every crop, 64 at a time (a thousand crops at once would hold GBs of activations)."""
    sess = session(path)
    return np.concatenate([sess.run(None, {"input": crops[i:i + chunk]})[0] for i in range(0, len(crops), chunk)])


def minilm_bench(out: Path, quick: bool) -> list[Row]:
    task = minilm_task(quick)

    def evaluate(path):
        return {k if k == "cosine_to_fp32" else f"spearman_{k}": v for k, v in task.quality(path).items()}

    feed = minilm.tokenize(["quantization keeps the meaning of this sentence intact"], max_length=128)
    return benchmark("MiniLM", task.fp32, task.calib, evaluate, feed, out)


def markdown(results: dict[str, list[Row]]) -> str:
    parts = []
    for model, rows in results.items():
        keys = sorted({k for r in rows for k in r.metrics})
        body = [[r.quantizer, *[f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in keys],
                 "-" if r.seconds is None else r.seconds, r.lint, "-" if r.latency_ms is None else r.latency_ms,
                 r.error or r.notes] for r in rows]
        headers = ["quantizer", *keys, "quantize s", "TensorRT lint", "latency ms (b=1, 1 thread)", "notes"]
        parts.append(f"### {model}\n\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
                     + "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in body))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    parser.add_argument("--out", default="scripts/results/bench_core", help="output path without extension")
    parser.add_argument("--models", default="mobilenet_v2,minilm", help="comma-separated subset")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only the quantizers whose label "
                                                   "contains one (FP32 always runs)")
    args = parser.parse_args()
    SELECTED[0] = only_filter(args.only)
    runners = {"mobilenet_v2": ("MobileNetV2", mobilenet), "minilm": ("all-MiniLM-L6-v2", minilm_bench)}
    results = {}
    for key in args.models.split(","):
        label, run = runners[key]
        results[label] = run(cache_dir("bench_core", key), args.quick)
        for row in results[label]:
            print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({m: [vars(r) for r in rows] for m, rows in results.items()}, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
