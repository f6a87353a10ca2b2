"""Benchmark (not a test): quantize time and peak memory against model size.

    python scripts/bench_scale.py [--depths 1,2,4,6] [--calib-windows 16] [--out scripts/results/scale]
    python scripts/bench_scale.py --same-run mobilenet,minilm,smollm2 [--out scripts/results/scale_same_run]
    python scripts/bench_scale.py --device-point 1b [--out DIR]

Depth series: SmolLM2-135M made deeper by running its 30 decoder layers k times in a row, each copy with
its own weights (benchlib.scale_models.repeat_layers; ×6 is about 2.7 GB of FP32 weights), saved with
external data under .cache/scale/. Each is quantized with the transformer-w8a8 recipe on the same
calibration windows, in a subprocess of its own, whose wall time and peak RSS (VmHWM of that process)
are reported against the parameter count. The deepest output is then loaded from its external data, run
in ONNX Runtime on one evaluation window and linted (onnxq lint, TensorRT rules). Writes <out>.json,
<out>.md and a plot <out>.html (and <out>.png where kaleido can render it). The repeated model's outputs
mean nothing as language; it is a real graph and real weights at a larger size.

Same run (--same-run): onnxq's default command, ORT quantize_static and ModelOpt INT8 on MobileNetV2,
all-MiniLM-L6-v2 and SmolLM2-135M, one after the other, each in a process of its own (wall time, peak RSS
of that process and of any it starts), with each output's accuracy beside it (benchlib.scale_anchors).

Device points (--device-point 1b|3b|<hidden>x<intermediate>x<layers>x<heads>): a LLaMA-shaped model with
random weights built directly in ONNX (no torch, no download), saved with external data, quantized and
checked the same way; calibration = random token windows. Needs only onnx, onnx_ir, onnxruntime and
numpy (torch for GPTQ rounding), and onnxq itself installed from the working tree without its
dependencies (`pip install --no-deps --no-build-isolation -e . -e ./models`: the source tree alone does
not import, as `passes/` installs as onnxq.passes). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib.scale_models import llama_parameters, random_llama, repeat_layers, save_external

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "scale"
RECIPE = "transformer-w8a8"
# (hidden, intermediate, layers, heads): TinyLlama's shape (1.1 B) and a 3 B LLaMA shape, vocabulary 32000
DEVICE_POINTS = {"1b": (2048, 5632, 22, 32), "3b": (3072, 8192, 26, 24)}


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ------------------------------------------------------------------------------------------------
# one step in a subprocess: its wall time and peak memory are its own


def worker(spec: dict) -> dict:
    start = time.perf_counter()
    if spec["step"] == "quantize":
        from onnxq.api import quantize

        calib = dict(np.load(spec["calib"]))
        quantize(spec["source"], calib, output=spec["output"], recipe=spec["recipe"], show_progress=False,
                 log=lambda *_: None, rounding=spec.get("rounding"))
    elif spec["step"] == "repeat":
        import onnx_ir as ir

        save_external(repeat_layers(ir.load(spec["source"]), spec["times"]), spec["output"])
    elif spec["step"] == "same_run":
        from benchlib.scale_anchors import quantize_step

        return quantize_step(spec)
    elif spec["step"] == "random_llama":
        hidden, intermediate, layers, heads = spec["shape"]
        save_external(random_llama(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads), spec["output"])
    from benchlib.scale_anchors import own_peak_kib

    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(own_peak_kib() / 2**20, 3)}


def in_subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], env=env, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"{spec['step']} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result_file.read_text())


# ------------------------------------------------------------------------------------------------
# checks on a quantized model


def parameters(path: Path) -> int:
    import onnx_ir as ir

    model = ir.load(path)  # external data stays on disk: only shapes are read
    return int(sum(np.prod(v.shape.numpy()) for v in model.graph.initializers.values()
                   if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and v.shape is not None and v.shape.rank() >= 1
                   and np.prod(v.shape.numpy()) >= 1024))


def check_output(path: Path, feed: dict[str, np.ndarray]) -> dict:
    """Loads from its external data, runs one window in ORT, and lints clean for TensorRT."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, feed)[0]
    lint = subprocess.run([sys.executable, "-m", "onnxq.cli.main", "lint", str(path), "--target", "tensorrt"],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    return {"ort_runs": bool(np.isfinite(logits).all()), "logits_shape": list(logits.shape),
            "lint_exit_code": lint.returncode, "lint_last_line": (lint.stdout.strip().splitlines() or [""])[-1]}


def data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# ------------------------------------------------------------------------------------------------
# depth series on SmolLM2


def depth_series(depths: list[int], calib_windows: int, out: str, argv) -> None:
    from onnxq_models import smollm2

    WORK.mkdir(parents=True, exist_ok=True)
    base = smollm2.cached_onnx()
    calib = WORK / f"calib_{calib_windows}.npz"
    if not calib.exists():
        np.savez(calib, **smollm2.calibration_feeds(calib_windows))
    window = smollm2.eval_windows(1)
    feed = {"input_ids": window, "attention_mask": np.ones_like(window)}
    # rows of other depths from an earlier run into the same file stay (a series run in parts)
    previous = json.loads(Path(out + ".json").read_text())["rows"] if Path(out + ".json").exists() else []
    rows = [r for r in previous if r["depth"] not in depths]
    for k in depths:
        source = WORK / f"smollm2_x{k}.onnx"
        if not source.exists():
            log(f"building x{k}")
            in_subprocess({"step": "repeat", "source": str(base), "times": k, "output": str(source)})
        params = parameters(source)
        log(f"quantize x{k} ({params / 1e6:.0f} M parameters)")
        output = WORK / f"smollm2_x{k}.int8.onnx"
        result = in_subprocess({"step": "quantize", "source": str(source), "calib": str(calib), "output": str(output),
                                "recipe": RECIPE})
        row = {"depth": k, "layers": 30 * k, "parameters": params, "fp32_gb": round(data_bytes(source) / 1e9, 3),
               "int8_gb": round(data_bytes(output) / 1e9, 3), **result}
        log(row)
        rows = sorted([*rows, row], key=lambda r: r["depth"])
        write(rows, out, argv, calib_windows)
    depth = max(r["depth"] for r in rows)  # the deepest of the whole series, this part or an earlier one
    check = check_output(WORK / f"smollm2_x{depth}.int8.onnx", feed)
    log("check", check)
    write(rows, out, argv, calib_windows, check={"model": f"x{depth}", **check})
    plot(rows, out)


def fit(rows: list[dict]) -> dict:
    """Least-squares lines: peak RSS (GB) and seconds against parameters (billions)."""
    p = np.array([r["parameters"] for r in rows]) / 1e9
    if len(rows) < 2:
        return {}
    rss_slope, rss_base = np.polyfit(p, [r["peak_rss_gb"] for r in rows], 1)
    s_slope, s_base = np.polyfit(p, [r["seconds"] for r in rows], 1)
    return {"rss_gb_per_billion": round(float(rss_slope), 2), "rss_gb_at_zero": round(float(rss_base), 2),
            # RSS is in GiB, parameters in units of 1e9
            "bytes_per_parameter": round(float(rss_slope) * 2**30 / 1e9, 2), "seconds_per_billion": round(float(s_slope), 1),
            "seconds_at_zero": round(float(s_base), 1)}


def write(rows, out, argv, calib_windows, check=None) -> None:
    command = "python scripts/bench_scale.py " + " ".join(argv)
    result = {"command": command, "recipe": RECIPE, "calibration": f"{calib_windows} windows x 256 tokens",
              "rows": rows, "fit": fit(rows), "check": check}
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    setup = (f"SmolLM2-135M with its decoder stack repeated k times (own weights per copy), quantized with "
             f"{RECIPE} on {calib_windows} calibration windows of 256 tokens, each in a subprocess of its own "
             "(peak RSS = that process's VmHWM, in GiB; model sizes in GB of 1e9 bytes). Timings are wall time on "
             "a 2-core machine.\n")
    lines = ["# Quantize time and peak memory against model size\n", f"Command: `{command}`\n", setup,
             "| depth | layers | parameters | FP32 GB | INT8 GB | quantize s | peak RSS GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| x{r['depth']} | {r['layers']} | {r['parameters'] / 1e6:.0f} M | {r['fp32_gb']} | {r['int8_gb']} | "
                     f"{r['seconds']} | {r['peak_rss_gb']} |")
    if result["fit"]:
        f = result["fit"]
        lines += ["", (f"Fit: peak RSS ≈ {f['rss_gb_at_zero']} GB + {f['rss_gb_per_billion']} GB per billion parameters "
                       f"({f['bytes_per_parameter']} bytes per parameter); time ≈ {f['seconds_at_zero']} s + "
                       f"{f['seconds_per_billion']} s per billion parameters.")]
    if check:
        lines += ["", (f"Check of {check['model']} (external data): ORT runs one window: {check['ort_runs']} "
                       f"(logits {check['logits_shape']}); onnxq lint exit code {check['lint_exit_code']} "
                       f"({check['lint_last_line']}).")]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def plot(rows, out) -> None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        log("plotly not installed: no plot")
        return
    p = [r["parameters"] / 1e6 for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("quantize wall time (s)", "peak RSS (GB)"))
    fig.add_trace(go.Scatter(x=p, y=[r["seconds"] for r in rows], mode="lines+markers", name="time"), row=1, col=1)
    fig.add_trace(go.Scatter(x=p, y=[r["peak_rss_gb"] for r in rows], mode="lines+markers", name="peak RSS"), row=1, col=2)
    fig.update_xaxes(title_text="parameters (millions)")
    fig.update_layout(title=f"onnxq {RECIPE}: SmolLM2 with repeated decoder layers", showlegend=False)
    fig.write_html(out + ".html", include_plotlyjs="cdn")
    try:
        fig.write_image(out + ".png")
    except Exception as exc:  # kaleido missing or without a browser: the HTML is the plot
        log(f"no PNG ({type(exc).__name__})")


# ------------------------------------------------------------------------------------------------
# device points: a random-weight LLaMA of a given size


def device_point(size: str, calib_windows: int, out: str, work: Path, argv, rounding: str | None = None) -> None:
    shape = DEVICE_POINTS.get(size) or tuple(int(x) for x in size.split("x"))
    hidden, intermediate, layers, heads = shape
    work.mkdir(parents=True, exist_ok=True)
    source, output = work / f"llama_{size}.onnx", work / f"llama_{size}.int8.onnx"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (calib_windows + 1, 256)).astype(np.int64)
    calib = work / "calib.npz"
    np.savez(calib, input_ids=ids[:-1], attention_mask=np.ones_like(ids[:-1]))
    log(f"building {size}: hidden {hidden}, intermediate {intermediate}, layers {layers}, heads {heads} "
        f"({llama_parameters(hidden, intermediate, layers) / 1e9:.2f} B parameters)")
    built = in_subprocess({"step": "random_llama", "shape": list(shape), "output": str(source)})
    log("built", built)
    result = in_subprocess({"step": "quantize", "source": str(source), "calib": str(calib), "output": str(output),
                            "recipe": RECIPE, "rounding": rounding})
    log("quantized", result)
    check = check_output(output, {"input_ids": ids[-1:], "attention_mask": np.ones_like(ids[-1:])})
    row = {"size": size, "shape": dict(zip(("hidden", "intermediate", "layers", "heads"), shape)),
           "parameters": parameters(source), "fp32_gb": round(data_bytes(source) / 1e9, 3),
           "int8_gb": round(data_bytes(output) / 1e9, 3), "build": built, "quantize": result, "check": check,
           "calibration": f"{calib_windows} random windows x 256 tokens", "cpus": os.cpu_count(),
           "rounding": rounding or "the recipe's (gptq)",
           "command": "python scripts/bench_scale.py " + " ".join(argv)}
    log(row)
    Path(out + ".json").write_text(json.dumps(row, indent=1) + "\n")
    Path(out + ".md").write_text(
        f"# Device point {size}\n\nCommand: `{row['command']}` on {os.cpu_count()} CPUs.\n\n"
        f"Random-weight LLaMA {row['shape']}, {row['parameters'] / 1e9:.2f} B parameters "
        f"({row['fp32_gb']} GB FP32, {row['int8_gb']} GB quantized), {RECIPE} (rounding: {row['rounding']}), "
        f"{row['calibration']}.\n\n"
        f"| step | seconds | peak RSS GiB |\n|---|---|---|\n| build | {built['seconds']} | {built['peak_rss_gb']} |\n"
        f"| quantize | {result['seconds']} | {result['peak_rss_gb']} |\n\n"
        f"Check: ORT runs one window: {check['ort_runs']}; lint exit code {check['lint_exit_code']}.\n")


def same_run(models: list[str], out: str, work: Path, argv) -> None:
    from benchlib.scale_anchors import TASKS
    from benchlib.scale_anchors import same_run as run_task

    command = "python scripts/bench_scale.py " + " ".join(argv)
    rows, evaluations = [], {}
    for key in models:
        task = TASKS[key]()
        evaluations[task.name] = task.evaluation
        rows += run_task(task, work / "same_run", in_subprocess, log)
        Path(out + ".json").write_text(json.dumps({"command": command, "cpus": os.cpu_count(), "evaluation": evaluations,
                                                   "rows": rows}, indent=1) + "\n")
    Path(out + ".md").write_text(same_run_table(rows, evaluations, command))


def same_run_table(rows: list[dict], evaluations: dict[str, str], command: str) -> str:
    from benchlib.scale_anchors import QUANTIZERS

    lines = ["# Quantize time and peak memory: onnxq, ORT and ModelOpt in one run\n",
             f"Command: `{command}` ({os.cpu_count()} CPUs)\n",
             "Each quantizer runs in a process of its own, one after the other; peak RSS is the largest of that "
             "process and any it starts. Accuracy: " + "; ".join(f"{k}: {v}" for k, v in evaluations.items()) + ".\n",
             "| model | quantizer | seconds | × ModelOpt | peak RSS GiB | × ModelOpt | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        anchor = next((a for a in rows if a["model"] == r["model"] and a["quantizer"] == QUANTIZERS[2]), {})
        accuracy = ", ".join(f"{k} {v}" for k, v in r.items()
                             if k not in ("model", "quantizer", "options", "seconds", "peak_rss_gb", "error"))
        if r.get("error"):
            accuracy = f"failed: {r['error']}"
        lines.append(f"| {r['model']} | {r['quantizer']} | {r.get('seconds', '-')} | {_ratio(r, anchor, 'seconds')} | "
                     f"{r.get('peak_rss_gb', '-')} | {_ratio(r, anchor, 'peak_rss_gb')} | {accuracy} |")
    return "\n".join(lines) + "\n"


def _ratio(row: dict, anchor: dict, key: str) -> str:
    ok = key in row and anchor.get(key) and not anchor.get("error")
    return f"{row[key] / anchor[key]:.2f}" if ok else "-"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="1,2,4,6", help="repetitions of SmolLM2's decoder stack (rows of other "
                        "depths already in the results file are kept)")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--out", default=None, help="output prefix (default scripts/results/scale, or "
                        "scripts/results/scale_device_<size> with --device-point)")
    parser.add_argument("--device-point", default=None,
                        help="1b, 3b or HIDDENxINTERMEDIATExLAYERSxHEADS: a random-weight LLaMA instead of the series")
    parser.add_argument("--same-run", default=None,
                        help="mobilenet,minilm,smollm2: onnxq, ORT and ModelOpt on these models instead of the series")
    parser.add_argument("--rounding", default=None, choices=("nearest", "gptq"),
                        help="device points: override the recipe's weight rounding (nearest: no GPTQ, to fit a time limit)")
    parser.add_argument("--work", default=None, help="folder for the models (default .cache/scale)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0
    work = Path(args.work) if args.work else WORK
    if args.same_run:
        same_run(args.same_run.split(","), args.out or str(REPO / "scripts" / "results" / "scale_same_run"), work, argv)
    elif args.device_point:
        out = args.out or str(REPO / "scripts" / "results" / f"scale_device_{args.device_point}")
        device_point(args.device_point, args.calib_windows, out, work, argv, args.rounding)
    else:
        depth_series([int(d) for d in args.depths.split(",")], args.calib_windows,
                     args.out or str(REPO / "scripts" / "results" / "scale"), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
