"""Batch-1 ONNX Runtime CPU latency of FP32 against `--target ort-cpu` models made on another machine
(benchmark, not a test): for timing on a CPU that has no photo packages or no room for the data.

    python scripts/time_ort_models.py pack DIR --inputs SAVED   # here, after scripts/bench_ort_cpu.py
    python scripts/time_ort_models.py time DIR --out RESULTS    # on the other machine

`pack` copies, per model, the FP32 model and one evaluation sample from a `bench_ort_cpu.py
--save-inputs` folder and the onnxq model bench_ort_cpu.py last wrote (.cache/bench_ort_cpu).
`time` runs each pair interleaved (6 rounds × 20 runs, 1 and 2 intra-op threads, ORT_ENABLE_ALL) and
writes RESULTS/latency.json; compare the min columns on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CACHE = Path(".cache/bench_ort_cpu")
NAMES = ("fp32", "onnxq_ort_cpu")


def pack(folder: Path, inputs: Path) -> None:
    for model in sorted(p for p in inputs.iterdir() if p.is_dir()):
        target = folder / model.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / "fp32.onnx", target / "fp32.onnx")
        shutil.copyfile(CACHE / model.name / "onnxq_ort_cpu.onnx", target / "onnxq_ort_cpu.onnx")
        name = json.loads((model / "input.json").read_text())
        np.savez(target / "sample.npz", **{name: np.load(model / "data.npz")["evaluation"][:1]})


def time_pair(folder: Path, threads: int, rounds: int = 6, runs: int = 20) -> dict:
    feed = {k: v.astype(np.float32) for k, v in np.load(folder / "sample.npz").items()}
    sessions = {}
    for name in NAMES:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    for session in sessions.values():
        for _ in range(5):
            session.run(None, feed)
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    fp32 = min(times["fp32"])
    return {name: {"min_ms": round(min(t), 3), "median_ms": round(float(np.median(t)), 3),
                   "min_vs_fp32": round(min(t) / fp32, 3)} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["pack", "time"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--inputs", type=Path, help="pack: a bench_ort_cpu.py --save-inputs folder")
    parser.add_argument("--out", type=Path, help="time: where latency.json goes")
    args = parser.parse_args()
    if (args.step == "pack" and args.inputs is None) or (args.step == "time" and args.out is None):
        parser.error("pack needs --inputs, time needs --out")
    if args.step == "pack":
        pack(args.folder, args.inputs)
        return
    results = {"onnxruntime": ort.__version__, "models": {}}
    for model in sorted(p for p in args.folder.iterdir() if p.is_dir()):
        by_threads = {f"threads{t}": time_pair(model, t) for t in (1, 2)}
        results["models"][model.name] = {name: {t: rows[name] for t, rows in by_threads.items()} for name in NAMES}
        print(model.name, json.dumps(results["models"][model.name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
