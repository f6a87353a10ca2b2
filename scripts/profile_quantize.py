"""Where quantizing takes its time (not a test): MobileNetV2 and all-MiniLM-L6-v2 with their default
(automatically chosen) recipes, on the calibration data scripts/bench_core.py uses.

    python scripts/profile_quantize.py [--models mobilenet_v2,minilm,llama:HxIxLxHEADS] [--recipe NAME] [--cprofile] [--out scripts/results/speed_profile_run]

Per model: wall and CPU time (time.process_time, all threads of the process, so ORT's worker threads
count), ONNX Runtime runs by pass, and calls and CPU time of each pass and of the pipeline's main
steps (wrapped in this script, the library left as it is); with --cprofile also a second, profiled
run (timer: process_time) by function. Writes <out>.json and <out>.md. On a shared machine wall time
is noisy; compare CPU times and call counts.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from benchlib.profiling import pass_on_stack

# functions timed (CPU, inclusive: a timed function inside another counts in both) and counted
TIMED = {
    "onnxq.pipeline.choice": ["choose_recipe"],
    "onnxq.pipeline.run": ["_outputs"],
    "onnxq.ir.checks": ["check_model", "infer_shapes", "input_problem"],
    "onnxq.ir.modelio": ["to_proto_without_weights"],
    "onnxq.runtime.session": ["session", "exposing"],
    "onnxq.stats.service": ["observe"],
    "onnxq.quant.calibrate": ["collect_statistics"],
    "onnxq.quant.calibrator_choice": ["choose_calibrator"],
    "onnxq.quant.gptq": ["collect_hessians", "gptq_round"],
    "onnxq.quant.bias_correction": ["correct_biases"],
}


_INHERITED = object()  # an attribute the class took from a base class


class Timers:
    """Wraps functions (wherever a loaded onnxq module holds them) and ORT's run and session start,
    accumulating calls and CPU seconds per name; pass applies are timed per pass name."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.cpu: collections.Counter = collections.Counter()
        self.runs_by_pass: collections.Counter = collections.Counter()
        self._undo: list = []

    def _timed(self, label: str, fn):
        timers = self

        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.calls[label] += 1
                timers.cpu[label] += time.process_time() - start
        return wrapper

    def _replace(self, owner, attr: str, new) -> None:
        self._undo.append((owner, attr, owner.__dict__.get(attr, _INHERITED)))
        setattr(owner, attr, new)

    def install(self) -> None:
        import importlib

        from onnxq.pipeline.registry import PASS_TABLE, pass_class

        for module, names in TIMED.items():
            importlib.import_module(module)
        for name in PASS_TABLE:
            cls = pass_class(name)
            self._replace(cls, "apply", self._timed(f"pass {name}", cls.__dict__["apply"]))
        for module, names in TIMED.items():
            for name in names:
                original = getattr(sys.modules[module], name)
                wrapped = self._timed(f"{module.rsplit('.', 1)[1]}.{name}", original)
                for holder in [m for k, m in sys.modules.items() if k.startswith("onnxq") and m is not None]:
                    for attr, value in list(vars(holder).items()):
                        if value is original:
                            self._replace(holder, attr, wrapped)
        timed_run = self._timed("ORT InferenceSession.run", ort.InferenceSession.run)
        timed_init = self._timed("ORT InferenceSession() start", ort.InferenceSession.__init__)

        def run(session, *args, **kwargs):
            self.runs_by_pass[pass_on_stack()] += 1
            return timed_run(session, *args, **kwargs)
        self._replace(ort.InferenceSession, "run", run)
        self._replace(ort.InferenceSession, "__init__", timed_init)

    def uninstall(self) -> None:
        for owner, attr, value in reversed(self._undo):
            if value is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
        self._undo.clear()


def _inputs(key: str):
    from onnxq_models import images, minilm, mobilenet_v2

    if key.startswith("llama:"):  # a random-weight LLaMA built in ONNX: nothing to download
        return _random_llama(key)
    if key == "mobilenet_v2":
        return mobilenet_v2.cached_onnx(), {"input": images.crops("calib", 128)}
    return minilm.cached_onnx(), minilm.calibration_feeds(96, 160)


def _random_llama(key: str):
    """llama:HIDDENxINTERMEDIATExLAYERSxHEADS, saved with external data; calibration = 16 random windows
    of 256 tokens (the scaling benchmark's device points)."""
    import numpy as np

    from benchlib.scale_models import random_llama, save_external

    hidden, intermediate, layers, heads = (int(x) for x in key.split(":", 1)[1].split("x"))
    path = Path(tempfile.mkdtemp(prefix="onnxq-profile-")) / "llama.onnx"
    save_external(random_llama(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads), path)
    ids = np.random.default_rng(0).integers(0, 32000, (16, 256)).astype(np.int64)
    return path, {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _short(func: tuple) -> str:
    path, line, name = func
    for marker in ("/onnxq/", "/passes/", "/onnx_ir/", "/onnxruntime/", "/onnx/", "/numpy/"):
        if marker in path:
            path = marker.strip("/") + "/" + path.split(marker, 1)[1]
            break
    else:
        path = Path(path).name
    return f"{path}:{line}({name})" if line else name


def profile(key: str, top: int, with_cprofile: bool, recipe: str | None = None) -> dict:
    import onnxq
    from onnxq.ir.modelio import load_model

    fp32, calib = _inputs(key)
    out = Path(tempfile.mkdtemp(prefix="onnxq-profile-")) / f"{key}.onnx"

    def quantize():
        onnxq.quantize(fp32, calib, output=out, recipe=recipe, show_progress=False, log=lambda *_: None)

    timers = Timers()
    timers.install()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        quantize()
    finally:
        timers.uninstall()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "model": key, "recipe": load_model(out).metadata_props.get("onnxq.recipe"),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "ort_runs_by_pass": dict(timers.runs_by_pass),
        "timed": {k: {"calls": timers.calls[k], "cpu_s": round(timers.cpu[k], 2)}
                  for k in sorted(timers.cpu, key=lambda k: -timers.cpu[k])},
    }
    if with_cprofile:  # a second run: the profiler's own cost inflates Python-heavy code several times
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        quantize()
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # func -> (primitive calls, calls, tottime, cumtime, callers)
        mine = [(f, s) for f, s in stats.items() if "/onnxq/" in f[0] or "/passes/" in f[0]]
        result["cprofile_onnxq_by_cumulative"] = [
            {"function": _short(f), "calls": s[1], "cum_cpu_s": round(s[3], 2)}
            for f, s in sorted(mine, key=lambda fs: -fs[1][3])[:top]]
        result["cprofile_all_by_own_time"] = [
            {"function": _short(f), "calls": s[1], "own_cpu_s": round(s[2], 2)}
            for f, s in sorted(stats.items(), key=lambda fs: -fs[1][2])[:top]]
    return result


def markdown(results: list[dict]) -> str:
    parts = []
    for r in results:
        runs = r["ort_runs_by_pass"]
        lines = [f"### {r['model']} (recipe {r['recipe']})", "",
                 (f"wall {r['wall_s']} s, CPU {r['cpu_s']} s; ORT runs {sum(runs.values())} "
                 f"({', '.join(f'{k} {v}' for k, v in runs.items())})"), "",
                 "| timed (CPU, inclusive) | calls | CPU s |", "|---|---|---|"]
        lines += [f"| {name} | {t['calls']} | {t['cpu_s']} |" for name, t in r["timed"].items()]
        if "cprofile_onnxq_by_cumulative" in r:
            lines += ["", "cProfile (second run, profiler overhead included):", "",
                      "| onnxq function | calls | cumulative CPU s |", "|---|---|---|"]
            lines += [f"| {f['function']} | {f['calls']} | {f['cum_cpu_s']} |" for f in r["cprofile_onnxq_by_cumulative"]]
            lines += ["", "| any function | calls | own CPU s |", "|---|---|---|"]
            lines += [f"| {f['function']} | {f['calls']} | {f['own_cpu_s']} |" for f in r["cprofile_all_by_own_time"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,minilm",
                        help="comma-separated: mobilenet_v2, minilm, or llama:HIDDENxINTERMEDIATExLAYERSxHEADS "
                             "(a random-weight LLaMA, e.g. llama:1024x2816x4x16)")
    parser.add_argument("--out", default="scripts/results/speed_profile_run", help="output path without extension")
    parser.add_argument("--recipe", default=None, help="a built-in recipe instead of the automatic choice")
    parser.add_argument("--top", type=int, default=25, help="functions listed per cProfile table")
    parser.add_argument("--cprofile", action="store_true", help="also a cProfile'd second run per model")
    args = parser.parse_args()
    results = [profile(key, args.top, args.cprofile, args.recipe) for key in args.models.split(",")]
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
