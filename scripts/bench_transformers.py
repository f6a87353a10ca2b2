"""Benchmark (not a test) of the transformer passes: onnxq's W8A8 / W4A8 / W4A4 recipes against ONNX
Runtime quantize_static and NVIDIA ModelOpt, on the same models and data, side by side in one run.

    python scripts/bench_transformers.py [--quick] [--models smollm2,minilm] [--out scripts/results/transformers]
                                         [--exporter torchscript|dynamo] [--with-auto]

Models and metrics:
* SmolLM2-135M (LLaMA architecture, RMSNorm, SwiGLU, grouped-query attention): perplexity on
  256-token windows of held-out enwiki articles; calibration windows come from disjoint articles.
* all-MiniLM-L6-v2 (post-LN BERT): Spearman on WordSim-353 and SimLex-999, mean cosine of sentence
  embeddings to FP32; calibration = wiki sentences plus single words (the evaluation embeds single
  words), none of them an evaluation word.

onnxq variants (every pass before `quantize` is exact and verified by the pipeline; the largest
relative change it measured is reported): plain W8A8 (canonical passes + INT8 Q/DQ), +smooth
(smooth, split_range), +rotate (fold_norm, rotate), +both (the built-in transformer-w8a8 recipe),
each with per-channel and per-tensor weights; transformer-w4a8 and transformer-w4a4.
Activations are per-tensor INT8 everywhere (the TensorRT setting).

Anchors: ORT quantize_static (symmetric INT8, per-tensor and per-channel weights; and with its
SmoothQuant option, which runs neural-compressor 2.6 in .cache/inc-venv), ModelOpt INT8 (its
default entropy calibration, and max).

`--exporter dynamo` benchmarks the models as torch.onnx.export(dynamo=True) writes them (transformers'
default sdpa attention, opset 20) instead of the TorchScript export; `--with-auto` adds the row of the
default command, where onnxq chooses the recipe itself.

Each quantizer runs in a subprocess of its own, so its wall time and peak memory (max RSS of the
process and of any subprocess it starts) are its own. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import REPO, log, only_filter
from benchlib.facts import model_facts

WORK = REPO / ".cache" / "bench_transformers"

CANONICAL = ("lift_constants", "fold_constants", "upgrade_opset", "fold_batchnorm", "equalize")
# which passes of the transformer-w8a8 recipe each ablation keeps (besides CANONICAL and quantize)
ABLATIONS = {"plain": (), "+smooth": ("smooth", "split_range"), "+rotate": ("fold_norm", "rotate"),
             "+both": ("fold_norm", "rotate", "smooth", "split_range")}


# ------------------------------------------------------------------------------------------------
# recipes


def onnxq_steps(variant: str, weights: str) -> list:
    """Pass objects of an onnxq variant: 'w8a8 <ablation>' or the name of a built-in recipe."""
    from onnxq.pipeline import load_recipe

    if variant == "auto":
        return None  # the default command: onnxq chooses the recipe
    if variant.startswith("w8a8 "):
        keep = ABLATIONS[variant.split(" ", 1)[1]]
        _, passes = load_recipe("transformer-w8a8")
        passes = [p for p in passes if p.name in CANONICAL or p.name == "quantize" or p.name in keep]
    else:
        _, passes = load_recipe(variant)
    # pass objects are frozen: a changed option is a new pass object (its bounds are checked again)
    return [dataclasses.replace(p, weights=weights) if p.name in ("quantize", "smooth") and hasattr(p, "weights")
            else p for p in passes]


# ------------------------------------------------------------------------------------------------
# one quantizer in a subprocess: wall time and peak memory are its own


def worker(spec: dict) -> dict:
    calib = dict(np.load(spec["calib"]))
    start = time.perf_counter()
    if spec["kind"] == "onnxq":
        from onnxq.api import quantize

        quantize(spec["source"], calib, output=spec["output"], recipe=onnxq_steps(spec["variant"], spec["weights"]),
                 rounding=spec.get("rounding"), batch_size=spec["batch_size"], show_progress=False, log=lambda *_: None)
        error, notes, seconds = None, "", time.perf_counter() - start
    else:
        from benchlib import anchors

        with tempfile.TemporaryDirectory(prefix="anchor-") as tmp, anchors.working_dir(tmp):
            if spec["kind"] == "ort":
                quantize_static = anchors.ort_smoothquant if spec.get("smooth_quant") else anchors.ort_quantize
                result = quantize_static(spec["source"], calib, spec["output"], per_channel=spec["per_channel"],
                                         batch_size=spec["batch_size"],
                                         **({"op_types_to_quantize": spec["op_types"]} if spec.get("op_types") else {}))
            else:
                result = anchors.modelopt_quantize(spec["source"], calib, spec["output"], timeout_s=1200,
                                                   calibration_method=spec.get("calibration_method", "entropy"))
        error = None if result.ok else (result.error or "failed").strip().splitlines()[-1][:300]
        notes = "; ".join(result.notes)
        seconds = result.seconds  # the quantizer's own call: no venv check, no failed first try
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"quantize_seconds": round(seconds, 1), "peak_memory_mb": round(peak_kb / 1024),
            "error": error, **({"notes": notes} if notes else {})}


def quantize_in_subprocess(spec: dict) -> dict:
    spec_file = Path(spec["output"]).with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    python = sys.executable
    if spec.get("smooth_quant"):  # ORT's SmoothQuant runs neural-compressor 2.x, which has a venv of its own
        from benchlib import anchors

        try:
            python = str(anchors.ensure_inc())
        except subprocess.CalledProcessError as exc:  # a row's failure, not the benchmark's
            return {"error": f"neural-compressor setup failed ({exc}): see bash scripts/setup_inc.sh"}
    proc = subprocess.run([python, __file__, "--worker", str(spec_file)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit status {proc.returncode}"}
    return json.loads(_result_file(spec_file).read_text())


def _result_file(spec_file: Path) -> Path:
    """Where the worker leaves its result (not stdout: quantizers print progress bars there)."""
    return spec_file.with_suffix(".result.json")


def quantizers(w8a8: list[tuple[str, str]], w4: bool) -> list[tuple[str, dict]]:
    rows = [(AUTO_LABEL, {"kind": "onnxq", "variant": "auto", "weights": "per-channel"})] if WITH_AUTO[0] else []
    rows += [(f"onnxq W8A8 {ab} ({w})", {"kind": "onnxq", "variant": f"w8a8 {ab}", "weights": w}) for ab, w in w8a8]
    if w4:
        rows += [("onnxq W4A8 +rotate (transformer-w4a8)", {"kind": "onnxq", "variant": "transformer-w4a8", "weights": "per-channel"}),
                 ("onnxq W4A8 +rotate, round-to-nearest", {"kind": "onnxq", "variant": "transformer-w4a8", "weights": "per-channel",
                                                          "rounding": "nearest"}),
                 ("onnxq W4A4 +rotate (transformer-w4a4)", {"kind": "onnxq", "variant": "transformer-w4a4", "weights": "per-channel"})]
    rows += [("ORT quantize_static s8 per-tensor", {"kind": "ort", "per_channel": False}),
             ("ORT quantize_static s8 per-channel", {"kind": "ort", "per_channel": True}),
             # ORT's documented setting for transformers: only the MatMuls quantized
             ("ORT quantize_static s8 per-channel, MatMul only", {"kind": "ort", "per_channel": True, "op_types": ["MatMul"]}),
             ("ORT quantize_static s8 per-tensor + SmoothQuant", {"kind": "ort", "per_channel": False, "smooth_quant": True}),
             ("ORT quantize_static s8 per-channel + SmoothQuant", {"kind": "ort", "per_channel": True, "smooth_quant": True}),
             ("ModelOpt INT8", {"kind": "modelopt"}),
             ("ModelOpt INT8, max calibration", {"kind": "modelopt", "calibration_method": "max"})]
    return rows


ALL_W8A8 = [(ab, w) for w in ("per-channel", "per-tensor") for ab in ABLATIONS]


def run_model(name: str, fp32: Path, calib: dict, evaluate, batch_size: int, w8a8: list[tuple[str, str]], w4: bool,
              skip_anchors: bool, report) -> list[dict]:
    """Every quantizer's row for one model; `report(rows)` after each, so a cut-short run keeps what it has."""
    work = WORK / (name if EXPORTER[0] == "torchscript" else f"{name}_{EXPORTER[0]}")
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calib.npz"
    np.savez(calib_file, **calib)
    rows = [{"quantizer": "FP32", **evaluate(fp32)}]
    log(f"[{name}] FP32", rows[0])
    report(rows)
    for label, spec in quantizers(w8a8, w4):
        if skip_anchors and spec["kind"] != "onnxq":
            continue
        if not SELECTED[0](label):
            continue
        out = work / (label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "") + ".onnx")
        out.unlink(missing_ok=True)
        spec = {**spec, "source": str(fp32), "calib": str(calib_file), "output": str(out), "batch_size": batch_size}
        info = quantize_in_subprocess(spec)
        row = {"quantizer": label, **info}
        if not info.get("error") and out.exists():
            row.update(evaluate(out))
            row.update(model_facts(out, with_coverage=False))
        rows.append(row)
        log(f"[{name}] {label}", {k: v for k, v in row.items() if k != "quantizer"})
        report(rows)
    return rows


# ------------------------------------------------------------------------------------------------
# models


def smollm2_rows(quick: bool, skip_anchors: bool, report) -> list[dict]:
    from onnxq_models import smollm2

    # 16 calibration windows: GPTQ's 576..1536-wide Hessians want more than 4 x 256 tokens (+1.16% -> +1.03%)
    n_cal, n_eval = (2, 2) if quick else (16, 32 if SPLIT[0] == "test" else 6)
    n_cal = SMOLLM2_CALIB_WINDOWS[0] or n_cal
    fp32 = smollm2.cached_onnx(dynamo=True, attention="sdpa") if EXPORTER[0] == "dynamo" else smollm2.cached_onnx()
    windows = smollm2.test_windows(n_eval) if SPLIT[0] == "test" else smollm2.eval_windows(n_eval)
    reference = {}

    def evaluate(path):
        ppl = smollm2.perplexity(str(path), windows)["ppl"]
        reference.setdefault("ppl", ppl)
        return {"ppl": round(ppl, 3), "ppl_increase_pct": round(100 * (ppl / reference["ppl"] - 1), 2)}

    setup = {"calibration": f"{n_cal} windows x {smollm2.SEQ_LEN} tokens (calibration articles)",
             "evaluation": f"{n_eval} windows x {smollm2.SEQ_LEN} tokens (evaluation articles, {SPLIT[0]} split)"}
    return run_model("smollm2", fp32, smollm2.calibration_feeds(n_cal), evaluate, 1, ALL_W8A8, True, skip_anchors,
                     lambda rows: report(rows, setup))


def minilm_rows(quick: bool, skip_anchors: bool, report) -> list[dict]:
    from benchlib.minilm_task import minilm_task

    task = minilm_task(quick, dynamo=EXPORTER[0] == "dynamo")
    calib, sentences = task.calib, task.sentences

    def evaluate(path):
        return {k: round(v, 4) for k, v in task.quality(path).items()}

    setup = {"calibration": f"{len(calib['input_ids'])} samples: wiki sentences + single words (32 tokens)",
             "evaluation": f"WordSim-353 / SimLex-999 word pairs; cosine over {len(sentences)} held-out sentences"}
    return run_model("minilm", task.fp32, calib, evaluate, 16, ALL_W8A8, True, skip_anchors, lambda rows: report(rows, setup))


# ------------------------------------------------------------------------------------------------
# report


def markdown(results: dict, command: str, seconds: float) -> str:
    lines = ["# Transformers: onnxq W8A8/W4A8/W4A4 vs ORT quantize_static vs ModelOpt\n",
             (f"`{command}` — {os.cpu_count()} CPU cores, total {seconds:.0f} s. Activations per-tensor INT8 in "
             "every quantized row; `exact Δ` is the largest relative output change any exact pass made "
             "(measured by the pipeline on a calibration batch).\n")]
    for model, block in results.items():
        rows = block["rows"]
        metrics = [k for k in rows[0] if k != "quantizer"]
        headers = ["quantizer", *metrics, "quantize s", "peak MB", "TensorRT lint", "exact Δ", "error / note"]
        lines += [f"## {model}\n", f"Calibration: {block['setup']['calibration']}. Evaluation: {block['setup']['evaluation']}.\n",
                  "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in rows:
            cells = [r["quantizer"], *[r.get(m, "") for m in metrics], r.get("quantize_seconds", ""),
                     r.get("peak_memory_mb", ""), r.get("lint", "" if r["quantizer"] == "FP32" else "-"),
                     r.get("exact_passes_max_rel_change", "") or "",
                     "; ".join(x for x in (r.get("error"), r.get("notes") and f"note: {r['notes']}") if x)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


SELECTED = [only_filter("")]  # --only
EXPORTER = ["torchscript"]  # --exporter
WITH_AUTO = [False]  # --with-auto
AUTO_LABEL = "onnxq default command (automatic recipe choice)"
SPLIT = ["dev"]  # --split: SmolLM2's evaluation windows
SMOLLM2_CALIB_WINDOWS = [0]  # --smollm2-calib-windows (0: the default)


def write_results(results: dict, out: str, argv, start: float) -> str:
    command = "python scripts/bench_transformers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=2))
    text = markdown(results, command.strip(), time.perf_counter() - start)
    out.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and samples, for a smoke run")
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated subset of minilm,smollm2")
    parser.add_argument("--skip-anchors", action="store_true", help="leave out ORT quantize_static and ModelOpt")
    parser.add_argument("--out", default="scripts/results/transformers", help="output path without extension")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only the quantizers whose label "
                        "contains one (FP32 always runs), e.g. '+both,ORT' to fit a time budget")
    parser.add_argument("--smollm2-calib-windows", type=int, default=0,
                        help="SmolLM2 calibration windows of 256 tokens (default 16; 2 with --quick)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="which torch.onnx exporter writes the FP32 models (dynamo: sdpa attention, opset 20)")
    parser.add_argument("--with-auto", action="store_true",
                        help="add the default command's row (onnxq chooses the recipe itself)")
    parser.add_argument("--split", choices=("dev", "test"), default="dev",
                        help="SmolLM2 evaluation text: dev (the 6 windows design choices were measured on) or test "
                             "(32 windows of the evaluation articles that no earlier benchmark evaluated on)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec_file = Path(args.worker)
        _result_file(spec_file).write_text(json.dumps(worker(json.loads(spec_file.read_text()))))
        return 0
    SELECTED[0] = only_filter(args.only)
    SMOLLM2_CALIB_WINDOWS[0] = args.smollm2_calib_windows
    SPLIT[0] = args.split
    EXPORTER[0] = args.exporter
    WITH_AUTO[0] = args.with_auto
    start = time.perf_counter()
    runners = {"smollm2": ("SmolLM2-135M", smollm2_rows), "minilm": ("all-MiniLM-L6-v2", minilm_rows)}
    results = {}
    for key in args.models.split(","):
        label, run = runners[key]

        def report(rows, setup, label=label):  # after each row: a cut-short run keeps what it has
            results[label] = {"setup": setup, "rows": list(rows)}
            write_results(results, args.out, argv, start)

        run(args.quick, args.skip_anchors, report)
    print("\n" + write_results(results, args.out, argv, start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
