"""Mixture-of-experts LM: onnxq's transformer recipes, AGQ and EBSS calibration, beside ORT and ModelOpt.

    python scripts/bench_moe.py --json scripts/results/moe.json

The model is the byte-level top-2-of-8 MoE LM of models/moe_lm.py (committed checkpoint), exported with a
dynamic sequence length. Rows (keys of --json, each with "ppl", per byte):

* fp32; w8a8: onnxq's transformer-w8a8 recipe, calibrated on text;
* w4a8_{gptq,agq}_{random,ebss}: transformer-w4a8 (INT4 weights in blocks of 32, GPTQ rounding) with plain
  GPTQ or AGQ (each expert's Hessian weighted by its gate), calibrated on text ("random": windows of the
  enwiki calibration articles) or on an EBSS set of the same size generated from the model;
* ort_quantize_static, modelopt: the anchors in their documented settings (several tried; the best kept, the
  others listed under "tried").

Calibration: 64 windows x 128 bytes either way (8,192 tokens); the expert coverage of each set (tokens routed
to each expert, per MoE layer) is reported. Evaluation: 64 windows x 256 bytes of held-out articles that no
design choice used. A .md table is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import lm_anchors, log, repo_relative
from benchlib.facts import lint_verdict

CALIB_WINDOWS, CALIB_LEN, EVAL_WINDOWS = 64, 128, 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file; a .md table is written beside it")
    parser.add_argument("--quick", action="store_true", help="few windows (a smoke run, not results)")
    parser.add_argument("--skip-anchors", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.json)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        run(Path(tmp), out, args.quick, args.skip_anchors)
    return 0


def run(folder: Path, out: Path, quick: bool, skip_anchors: bool) -> None:
    import onnxruntime as ort

    from onnxq.stats.ebss import build_ebss, expert_coverage
    from onnxq_models import moe_lm

    model = moe_lm.export_onnx(moe_lm.load(), folder / "moe_lm.onnx")
    n_cal, n_eval = (8, 8) if quick else (CALIB_WINDOWS, EVAL_WINDOWS)
    held = moe_lm.windows(moe_lm.corpus("heldout"), n_eval, 256)

    def ppl(path) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return round(2.0 ** moe_lm.bits_per_byte(lambda ids: session.run(None, {"input_ids": ids})[0], held), 4)

    results: dict = {"fp32": {"ppl": ppl(model)}}
    log("fp32", results["fp32"])
    start = time.perf_counter()
    ebss = build_ebss(str(model), sequences=n_cal, length=CALIB_LEN, show_progress=False)
    sets = {"random": {"input_ids": moe_lm.windows(moe_lm.corpus("calib"), n_cal, CALIB_LEN)},
            "ebss": {"input_ids": ebss.ids}}
    coverage = {name: expert_coverage(str(model), data["input_ids"]) for name, data in sets.items()}
    results["calibration"] = {name: {"tokens": int(data["input_ids"].size), **_coverage_facts(coverage[name])}
                              for name, data in sets.items()}
    results["calibration"]["ebss"]["build_seconds"] = round(time.perf_counter() - start, 1)
    log("calibration", results["calibration"])
    _write(results, out)

    rows = [("w8a8", "transformer-w8a8", {}, "random")]
    rows += [(f"w4a8_{kind}_{data}", "transformer-w4a8", {"agq": kind == "agq"}, data)
             for kind in ("gptq", "agq") for data in ("random", "ebss")]
    for key, recipe, options, data in rows:
        results[key] = _onnxq_row(model, sets[data], recipe, options, folder / f"{key}.onnx", ppl)
        results[key]["calibration"] = data
        log(key, results[key])
        _write(results, out)
    if not skip_anchors:
        for key, tries in (("ort_quantize_static", lm_anchors.ort_tries()), ("modelopt", lm_anchors.modelopt_tries())):
            results[key] = lm_anchors.best_anchor(model, sets["random"], tries, folder, ppl)
            log(key, results[key])
            _write(results, out)


def _onnxq_row(model: Path, calib: dict, recipe: str, options: dict, output: Path, ppl) -> dict:
    from onnxq.api import quantize
    from onnxq.ir.modelio import load_model

    start = time.perf_counter()
    quantize(str(model), calib, output=str(output), recipe=recipe, batch_size=8, show_progress=False,
             log=lambda *_: None, **options)
    seconds = time.perf_counter() - start
    return {"ppl": ppl(output), "quantize_seconds": round(seconds, 1), **lint_verdict(load_model(str(output)))}


def _coverage_facts(counts: np.ndarray) -> dict:
    """Tokens per expert, per MoE layer: the fewest, the most, and the balance (std of the shares)."""
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return {"min_tokens_per_expert": int(counts.min()), "min_per_layer": counts.min(axis=1).tolist(),
            "max_per_layer": counts.max(axis=1).tolist(), "share_std": round(float(shares.std(axis=1).mean()), 4)}


def _write(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1) + "\n")
    fp32 = results["fp32"]["ppl"]
    lines = ["| variant | ppl (per byte) | vs FP32 | calibration | lint | quantize s |", "|---|---|---|---|---|---|"]
    for key, row in results.items():
        if key == "calibration" or not isinstance(row, dict) or row.get("ppl") is None:
            continue
        lines.append(lm_anchors.ppl_row(key, row, fp32, row.get("calibration", "")))
    for name, facts in results.get("calibration", {}).items():
        lines.append(f"\n- calibration set {name}: {facts['tokens']} tokens; fewest tokens on one expert "
                     f"{facts['min_tokens_per_expert']} (per layer {facts['min_per_layer']}); share std {facts['share_std']}")
    lines += ["", f"Command: `python scripts/bench_moe.py {' '.join(sys.argv[1:])}`; results in {repo_relative(out)}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
