"""The same-run part of bench_scale: onnxq's default command, ORT quantize_static and ModelOpt on one model
and one calibration set, each in a process of its own, timed and measured for peak memory, with the
model's accuracy beside each row.

Settings: onnxq as a user runs it (the recipe it picks by itself); ORT quantize_static in its
documented setting for the model (per-channel s8 weights and symmetric per-tensor activations, the
TensorRT setting; on transformers only the MatMuls, as ORT advises); ModelOpt INT8 with its default
entropy calibrator, or max where entropy crashes (SmolLM2).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANTIZERS = ("onnxq (default command)", "ORT quantize_static", "ModelOpt INT8")


@dataclass
class Task:
    """A model, its calibration set, an accuracy measure and how each anchor is set for it."""

    name: str
    fp32: Path
    calib: dict[str, np.ndarray]
    accuracy: Callable[[Path], dict[str, float]]
    ort_options: dict
    modelopt_options: dict
    evaluation: str  # what the accuracy is measured on


def mobilenet_task() -> Task:
    from onnxq.runtime.session import session
    from onnxq_models import images, mobilenet_v2

    fp32 = mobilenet_v2.cached_onnx()
    test = images.crops("test", 1012)

    def logits(path):
        sess = session(path)
        return np.concatenate([sess.run(None, {"input": test[i:i + 64]})[0] for i in range(0, len(test), 64)])

    reference = logits(fp32).argmax(1)
    return Task("MobileNetV2", fp32, {"input": images.crops("calib", 128)},
                lambda path: {"top1_agreement_test": round(float(np.mean(logits(path).argmax(1) == reference)), 4)},
                {"per_channel": True}, {}, "top-1 agreement with FP32, 1012 test crops of 23 photos")


def minilm_task() -> Task:
    from benchlib.minilm_task import minilm_task as task

    t = task(False)
    return Task("all-MiniLM-L6-v2", t.fp32, t.calib,
                lambda path: {k: round(v, 4) for k, v in t.quality(path).items()},
                {"per_channel": True, "op_types_to_quantize": ["MatMul"]}, {},
                "Spearman on WordSim-353 and SimLex-999, cosine to FP32 on 300 held-out sentences")


def smollm2_task() -> Task:
    from onnxq_models import smollm2

    windows = smollm2.test_windows(32)
    return Task("SmolLM2-135M", smollm2.cached_onnx(), smollm2.calibration_feeds(16),
                lambda path: {"ppl": round(smollm2.perplexity(str(path), windows)["ppl"], 3)},
                {"per_channel": True, "op_types_to_quantize": ["MatMul"]}, {"calibration_method": "max"},
                "perplexity on the test split, 32 windows x 256 tokens")


TASKS = {"mobilenet": mobilenet_task, "minilm": minilm_task, "smollm2": smollm2_task}


def quantize_step(spec: dict) -> dict:
    """Runs in the measured subprocess: one quantizer on one model; returns wall seconds and the peak RSS
    of this process or of any process it started (ModelOpt runs in its own virtual environment)."""
    calib = dict(np.load(spec["calib"]))
    start = time.perf_counter()
    error = None
    if spec["quantizer"] == QUANTIZERS[0]:
        from onnxq.api import quantize

        quantize(spec["source"], calib, output=spec["output"], show_progress=False, log=lambda *_: None)
    else:
        from benchlib import anchors

        fn = anchors.ort_quantize if spec["quantizer"] == QUANTIZERS[1] else anchors.modelopt_quantize
        result = fn(spec["source"], calib, spec["output"], **spec["options"])
        error = None if result.ok else result.error.strip().splitlines()[-1][:300]
    peak = max(own_peak_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 2**20, 3), "error": error}


def own_peak_kib() -> int:
    """This process's peak RSS in KiB. Not ru_maxrss: Linux carries a forked child's high-water mark
    (the parent's RSS at fork) across exec, so a worker started by a large parent would report the
    parent's size; VmHWM belongs to the process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def same_run(task: Task, work: Path, in_subprocess: Callable[[dict], dict], log) -> list[dict]:
    """Every quantizer on `task`, one after the other in one run; rows with time, memory and accuracy."""
    work.mkdir(parents=True, exist_ok=True)
    calib = work / f"{task.name}_calib.npz"
    np.savez(calib, **task.calib)
    rows = [{"model": task.name, "quantizer": "FP32", **task.accuracy(task.fp32)}]
    for quantizer in QUANTIZERS:
        options = (task.ort_options if quantizer == QUANTIZERS[1] else task.modelopt_options
                   if quantizer == QUANTIZERS[2] else {})
        output = work / f"{task.name}_{quantizer.split()[0].lower()}.onnx"
        log(f"{task.name}: {quantizer}")
        measured = in_subprocess({"step": "same_run", "quantizer": quantizer, "source": str(task.fp32),
                                  "calib": str(calib), "output": str(output), "options": options})
        row = {"model": task.name, "quantizer": quantizer, "options": options, **measured}
        if not measured["error"]:
            row.update(task.accuracy(output))
        log(row)
        rows.append(row)
    return rows
