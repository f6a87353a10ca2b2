"""ONNX Runtime CPU latency of one model on fixed feeds (median of timed runs)."""

from __future__ import annotations

import os
import time

import numpy as np


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """A CPUExecutionProvider session with full graph optimisation (ORT's default level)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_latency_ms(path: str | os.PathLike, feeds: dict[str, np.ndarray], runs: int = 100,
                   warmup: int = 10, threads: int | None = None) -> dict[str, float]:
    """{'median_ms', 'p90_ms', 'min_ms'} over `runs` calls after `warmup` untimed ones."""
    session = cpu_session(path, threads)
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    times = np.asarray(times)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "min_ms": float(times.min())}


def interleaved_latency(models: dict[str, str | os.PathLike], feeds: dict[str, np.ndarray], rounds: int = 5,
                        runs: int = 30, threads: int = 1) -> dict[str, float]:
    """Median over rounds of each model's per-round minimum (ms): robust to other jobs on a shared CPU."""
    per_model = {name: [] for name in models}
    for _ in range(rounds):
        for name, path in models.items():
            per_model[name].append(ort_latency_ms(path, feeds, runs=runs, warmup=5, threads=threads)["min_ms"])
    return {name: round(float(np.median(v)), 2) for name, v in per_model.items()}
