"""Benchmark (not a test) of fully quantized graphs: issue 4.

1. Function level: every supported function over its benchmark range; DULUT 32+32 against uniform
   LUTs of 256 and 64 entries and the I-LLM integer form: max and mean error in INT8 output steps.
2. all-MiniLM-L6-v2: FP32; onnxq W8A8 with GELU/Softmax/LayerNorm left in float; onnxq full-int8
   (all of them replaced) and variants/ablations; ONNX Runtime quantize_static and NVIDIA ModelOpt.
   Spearman on WordSim-353 and SimLex-999, mean cosine of the word embeddings to FP32, coverage,
   TensorRT lint, ORT CPU latency.
3. SmolLM2-135M: perplexity of FP32, W8A8 (nonlinear ops in float) and full-int8 (SiLU, Softmax,
   RMSNorm replaced), each with and without the transformer rotation passes; ORT CPU latency.

Run:  python scripts/bench_full_int8.py [--quick] [--skip-smollm2] [--skip-anchors]
Writes scripts/results/full_int8{,_quick}.json and .md. Derived models are cached under
.cache/full_int8/ (git-ignored); --quick uses fewer functions, words, windows and runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import REPO, log
from benchlib.facts import model_facts
from benchlib.latency import ort_latency_ms

os.environ.setdefault("ONNXQ_CACHE_DIR", str(REPO / ".cache" / "full_int8"))

from onnxq.passes.nonlinear.integer_ref import di_exp_function, di_sigmoid_function
from onnxq.passes.nonlinear.lut import DEFAULT_RANGES, FUNCTIONS, build_dulut, build_uniform, fidelity, output_step

RESULTS = REPO / "scripts" / "results"
WORK = Path(os.environ["ONNXQ_CACHE_DIR"])
REPLACING = ("qans", "dulut", "integer_ops")
FUNCTION_NAMES = ["gelu", "gelu_tanh", "silu", "sigmoid", "softplus", "tanh", "hardswish", "exp"]


# ------------------------------------------------------------------------------------------------
# 1. Function level


def illm_form(name: str, x: np.ndarray, lo: float, hi: float) -> np.ndarray | None:
    """The integer-only form of `name` the I-LLM family uses (8-bit input), None where it has none.

    exp: DI-Exp; sigmoid: DI-Exp based e(0)/(e(0)+e(-|x|)); SiLU: x_q·σ (DI-SwiGLU); GELU (both
    forms): x_q·σ(1.702·x), I-ViT's ShiftGELU; tanh: 2σ(2x) - 1."""
    amax = max(abs(lo), abs(hi))
    xq = np.clip(np.round(x / (amax / 127)), -127, 127) * (amax / 127)
    if name == "exp":
        return di_exp_function(x, lo)
    if name == "sigmoid":
        return di_sigmoid_function(x, amax)
    if name == "silu":
        return xq * di_sigmoid_function(x, amax)
    if name in ("gelu", "gelu_tanh"):
        return xq * di_sigmoid_function(1.702 * x, 1.702 * amax)
    if name == "tanh":
        return 2 * di_sigmoid_function(2 * x, 2 * amax) - 1
    return None


def function_table(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        lo, hi = DEFAULT_RANGES[name]
        fn = FUNCTIONS[name]
        start = time.perf_counter()
        dulut = build_dulut(name, lo, hi, (32, 32))
        seconds = time.perf_counter() - start
        row = {"function": name, "range": [lo, hi], "output_step": output_step(fn, lo, hi),
               "dulut_32_32": _fid(fidelity(dulut, name, lo, hi)), "dulut_seconds": round(seconds, 2),
               "dulut_warp_only": round(dulut.history[0], 4),
               "uniform_256": _fid(fidelity(build_uniform(name, lo, hi, 256), name, lo, hi)),
               "uniform_64": _fid(fidelity(build_uniform(name, lo, hi, 64), name, lo, hi)),
               "uniform_64_plain": _fid(fidelity(build_uniform(name, lo, hi, 64, fit=False), name, lo, hi)),
               "uniform_32": _fid(fidelity(build_uniform(name, lo, hi, 32), name, lo, hi))}
        x = np.linspace(lo, hi, 20001)
        approx = illm_form(name, x, lo, hi)
        if approx is not None:
            err = np.abs(approx - fn(x)) / row["output_step"]
            row["illm_integer"] = {"max_steps": round(float(err.max()), 4), "mean_steps": round(float(err.mean()), 4)}
        else:
            row["illm_integer"] = None
        rows.append(row)
        log(f"  {name:10s} DULUT {row['dulut_32_32']['max_steps']:.3f}  U256 {row['uniform_256']['max_steps']:.4f}  "
            f"U64 {row['uniform_64']['max_steps']:.3f}  I-LLM {approx is not None and row['illm_integer']['max_steps']}")
    return rows


def _fid(f) -> dict:
    return {"max_steps": round(f.max_steps, 4), "mean_steps": round(f.mean_steps, 4)}


# ------------------------------------------------------------------------------------------------
# Recipes: the built-in full-int8, and what it is compared with


def recipe(variant: str, residual_adds: list[str] = ()) -> list:
    """Pass list of a variant, derived from the built-in full-int8 recipe (same quantize settings).

    "w8a8" drops the replacing passes (nonlinear ops stay float); "nonlinear-only" drops quantize
    (FP32 linear layers, every nonlinear op replaced: the replacements' own cost); "-no-smooth" drops
    smooth; "+rotate" adds fold_norm + rotate before quantize; "+float-residual" keeps the residual
    Adds (`residual_adds`) out of quantization."""
    from onnxq.pipeline import load_recipe, make_pass

    _, passes = load_recipe("full-int8")
    name, *mods = variant.split("+")
    if name.endswith("-no-smooth"):
        name = name[:-len("-no-smooth")]
        passes = [p for p in passes if p.name != "smooth"]
    by_name = {p.name: p for p in passes}
    if "rotate" in mods and "rotate" not in by_name:  # rotation first, then smoothing (OSTQuant's order)
        at = next(i for i, p in enumerate(passes) if p.name in ("smooth", "quantize"))
        passes = passes[:at] + [make_pass("fold_norm"), make_pass("rotate")] + passes[at:]
    if "float-residual" in mods:
        by_name["quantize"].exclude = list(residual_adds)
    base = [p for p in passes if p.name not in REPLACING]
    keep = {"w8a8": (), "full-int8": REPLACING, "nonlinear-only": REPLACING, "w8a8+qans": ("qans",),
            "w8a8+dulut": ("dulut",), "w8a8+integer_norm": ("integer_ops",)}
    if name == "full-int8-lut8":
        extra = [by_name["qans"], make_pass("dulut", {"quantize_input": True}), by_name["integer_ops"]]
    elif name == "full-int8-illm-softmax":
        extra = [by_name["dulut"], make_pass("integer_ops", {"ops": ["softmax", "norm"]})]
    else:
        key = name + ("+" + mods[0] if mods and mods[0] in ("qans", "dulut", "integer_norm") else "")
        extra = [p for p in passes if p.name in keep[key]]
    if name == "nonlinear-only":
        base = [p for p in base if p.name != "quantize"]
    return base + extra


def quantize_variant(model_path: Path, calib: dict, variant: str, out: Path, batch_size: int,
                     residual_adds: list[str] = ()) -> dict:
    from onnxq.api import quantize

    start = time.perf_counter()
    quantize(str(model_path), calib, output=str(out), recipe=recipe(variant, residual_adds), batch_size=batch_size,
             show_progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return {"quantize_seconds": round(seconds, 1), **model_facts(out)}


def latency(path: Path, feeds: dict, runs: int) -> dict:
    return {k: round(v, 2) for k, v in ort_latency_ms(path, feeds, runs=runs, warmup=max(2, runs // 10)).items()}


# ------------------------------------------------------------------------------------------------
# 2. MiniLM


def minilm_calibration(n_sentences: int, n_words: int) -> dict:
    from onnxq_models import minilm

    return minilm.calibration_feeds(n_sentences, n_words, 32)


def minilm_eval(path: Path, words: list[str], ref: np.ndarray | None) -> tuple[dict, np.ndarray]:
    import onnxruntime as ort

    from onnxq_models import minilm, text_data

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vectors = minilm.embed(sess, words)
    index = {w: i for i, w in enumerate(words)}
    out = {}
    for dataset in text_data.WORD_SETS:
        out[dataset] = round(text_data.word_similarity_spearman(lambda ws: vectors[[index[w] for w in ws]], dataset), 4)
    if ref is not None:
        out["cosine_to_fp32"] = round(float(np.mean(np.sum(vectors * ref, axis=1))), 5)
    return out, vectors


def run_minilm(args) -> dict:
    from onnxq_models import minilm, text_data

    fp32 = minilm.cached_onnx()
    calib = minilm_calibration(96, 160)  # the calibration set of bench_transformers, also in --quick
    words = sorted({w for d in text_data.WORD_SETS for pair in text_data.word_pairs(d)[0] for w in pair})
    feeds = minilm.tokenize(text_data.wiki_sentences("eval")[:8], 64)
    runs = 10 if args.quick else 40
    result = {"calibration_samples": len(calib["input_ids"]), "eval_words": len(words),
              "latency_feed": "8 sentences x 64 tokens", "models": {}}
    scores, ref = minilm_eval(fp32, words, None)
    result["models"]["fp32"] = {**scores, "cosine_to_fp32": 1.0, "latency_ms": latency(fp32, feeds, runs),
                                **model_facts(fp32)}
    log("  fp32", scores)
    variants = ["w8a8", "full-int8"] if args.quick else [
        "w8a8", "full-int8", "nonlinear-only", "full-int8-lut8", "full-int8-illm-softmax", "w8a8+qans", "w8a8+dulut",
        "w8a8+integer_norm", "w8a8-no-smooth", "full-int8-no-smooth"]
    for variant in variants:
        out = WORK / "minilm" / f"{variant}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        facts = quantize_variant(fp32, calib, variant, out, batch_size=16)
        scores, _ = minilm_eval(out, words, ref)
        lat = latency(out, feeds, runs) if variant in ("w8a8", "full-int8", "full-int8-lut8", "nonlinear-only") else None
        result["models"][f"onnxq {variant}"] = {**scores, "latency_ms": lat, **facts}
        log(f"  onnxq {variant}", scores, lat)
    if not args.skip_anchors:
        from benchlib import anchors

        with tempfile.TemporaryDirectory(prefix="anchors-") as tmp, anchors.working_dir(tmp):
            runs_anchor = [("ort s8 per-channel minmax", lambda o: anchors.ort_quantize(
                               fp32, calib, o, per_channel=True, calibrate="minmax", symmetric_activations=True)),
                           ("modelopt int8 max", lambda o: anchors.modelopt_quantize(fp32, calib, o,
                                                                                     calibration_method="max")),
                           ("modelopt int8 entropy", lambda o: anchors.modelopt_quantize(fp32, calib, o))]
            for name, fn in runs_anchor:  # cheap on MiniLM: every anchor, also in --quick
                out = WORK / "minilm" / (name.replace(" ", "_") + ".onnx")
                res = fn(out)
                if not res.ok:
                    result["models"][name] = {"error": res.error.splitlines()[-1] if res.error else "failed"}
                    log(f"  {name} FAILED: {result['models'][name]['error']}")
                    continue
                scores, _ = minilm_eval(res.output, words, ref)
                result["models"][name] = {**scores, "quantize_seconds": round(res.seconds, 1),
                                          "latency_ms": latency(res.output, feeds, runs), **model_facts(res.output)}
                log(f"  {name}", scores)
    return result


# ------------------------------------------------------------------------------------------------
# 3. SmolLM2


def _residual_adds(path: Path) -> list[str]:
    """Names of the residual-stream Adds (onnxq.analysis.structure) after the recipe's canonical passes: quantizing
    their residual input per tensor (TensorRT rule 11) wipes out a stream with massive activations."""
    from onnxq.analysis import structure
    from onnxq.ir.modelio import load_model
    from onnxq.pipeline import PassContext, run_pipeline

    model = load_model(str(path))
    run_pipeline(model, [p for p in recipe("w8a8") if p.name in ("lift_constants", "fold_constants", "upgrade_opset")],
                 PassContext(show_progress=False), verify_exact=False)
    stream = structure.analyse(model).stream
    return [n.name for n in stream.adds] if stream is not None else []


def run_smollm2(args) -> dict:
    from onnxq_models import smollm2

    fp32 = smollm2.cached_onnx()
    n_cal, n_eval = (4, 4) if args.quick else (16, 24)
    n_eval = args.smollm2_eval_windows or n_eval
    calib = smollm2.calibration_feeds(n_cal)
    windows = smollm2.eval_windows(n_eval)
    feeds = {"input_ids": windows[:1], "attention_mask": np.ones_like(windows[:1])}
    runs = 3 if args.quick else 10
    result = {"calibration_windows": n_cal, "eval_windows": n_eval, "seq_len": int(windows.shape[1]),
              "latency_feed": f"1 x {windows.shape[1]} tokens", "models": {}}
    ppl = smollm2.perplexity(str(fp32), windows)
    result["models"]["fp32"] = {**ppl, "latency_ms": latency(fp32, feeds, runs), **model_facts(fp32)}
    log("  fp32", ppl)
    variants = ["w8a8", "full-int8"] if args.quick else [
        "nonlinear-only", "w8a8", "full-int8", "w8a8+float-residual", "full-int8+float-residual",
        "w8a8+rotate+float-residual", "full-int8+rotate+float-residual"]
    residual_adds = _residual_adds(fp32)
    result["residual_adds_kept_float"] = len(residual_adds)
    for variant in variants:
        out = WORK / "smollm2" / f"{variant}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            facts = quantize_variant(fp32, calib, variant, out, batch_size=1, residual_adds=residual_adds)
        except Exception as exc:
            result["models"][f"onnxq {variant}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            log(f"  onnxq {variant} FAILED", result["models"][f"onnxq {variant}"])
            continue
        ppl = smollm2.perplexity(str(out), windows)
        ppl["ppl_vs_fp32"] = round(ppl["ppl"] / result["models"]["fp32"]["ppl"] - 1, 4)
        lat = latency(out, feeds, runs) if variant in ("w8a8", "full-int8", "nonlinear-only") else None
        result["models"][f"onnxq {variant}"] = {**ppl, "latency_ms": lat, **facts}
        log(f"  onnxq {variant}", ppl, lat)
    return result


# ------------------------------------------------------------------------------------------------
# Report


def markdown(res: dict) -> str:
    lines = [f"# Fully quantized graphs (issue 4){' — quick run' if res['quick'] else ''}", "",
             f"{res['machine']}; command: `{res['command']}`; {res['seconds']:.0f} s.", ""]
    lines += ["## Function level: max (mean) error in INT8 output steps, (max f - min f)/255 over the range", "",
              "| function | range | DULUT 32+32 | warp only | uniform 256 | uniform 64 | uniform 64 (f at grid) | uniform 32 | I-LLM integer |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["functions"]:
        cell = lambda d: "—" if d is None else f"{d['max_steps']:.3f} ({d['mean_steps']:.3f})"
        lines.append(f"| {r['function']} | [{r['range'][0]:g}, {r['range'][1]:g}] | {cell(r['dulut_32_32'])} | "
                     f"{r['dulut_warp_only']:.3f} | {cell(r['uniform_256'])} | {cell(r['uniform_64'])} | "
                     f"{cell(r['uniform_64_plain'])} | {cell(r['uniform_32'])} | {cell(r['illm_integer'])} |")
    for key, title, metrics in (("minilm", "all-MiniLM-L6-v2", ("wordsim353", "simlex999", "cosine_to_fp32")),
                                ("smollm2", "SmolLM2-135M", ("ppl", "ppl_vs_fp32"))):
        if key not in res:
            continue
        lines += ["", f"## {title}", ""]
        if res[key].get("residual_adds_kept_float"):
            lines += [(f"`+float-residual`: the {res[key]['residual_adds_kept_float']} residual-stream Adds are excluded from "
                      "quantization (their residual input stays float); `nonlinear-only`: no quantize step, every "
                      "nonlinear op replaced (the replacements' own cost)."), ""]
        lines += ["| model | " + " | ".join(metrics) +
                  " | nonlinear coverage | coverage (count / FLOPs) | remaining nonlinear ops | worst table/integer error (steps) | lint | latency ms (median) |",
                  "|---|" + "---|" * (len(metrics) + 6)]
        for name, m in res[key]["models"].items():
            if "error" in m:
                lines.append(f"| {name} | failed: {m['error']} |")
                continue
            worst = ", ".join(f"{f} {v:g}" for f, v in m.get("fidelity_max_steps", {}).items()) or "—"
            lat = m.get("latency_ms")
            lines.append(f"| {name} | " + " | ".join(str(m.get(k, "—")) for k in metrics) +
                         f" | {m['nonlinear_coverage']:.0%} | {m['coverage_by_count']:.0%} / {m['coverage_by_flops']:.1%} | "
                         f"{', '.join(m['remaining_nonlinear']) or 'none'} | {worst} | {m['lint']} | "
                         f"{lat['median_ms'] if lat else '—'} |")
    lines += ["", "## Checks against the issue's \"done when\"", ""] + [f"- {c}" for c in checks(res)]
    return "\n".join(lines) + "\n"


def checks(res: dict) -> list[str]:
    out = []
    funcs = res["functions"]
    worst = max(funcs, key=lambda r: r["dulut_32_32"]["max_steps"])
    out.append(f"every function's DULUT 32+32 below one INT8 output step: "
               f"{'yes' if worst['dulut_32_32']['max_steps'] < 1 else 'NO'} (worst {worst['function']} "
               f"{worst['dulut_32_32']['max_steps']:.3f} steps)")
    exp = next((r for r in funcs if r["function"] == "exp"), None)
    if exp:
        out.append(f"DULUT beats a uniform 64-entry table on exp: "
                   f"{'yes' if exp['dulut_32_32']['max_steps'] < exp['uniform_64']['max_steps'] else 'NO'} "
                   f"({exp['dulut_32_32']['max_steps']:.3f} vs {exp['uniform_64']['max_steps']:.3f} steps)")
    if "minilm" in res:
        m = res["minilm"]["models"]
        fq, fp = m.get("onnxq full-int8", {}), m["fp32"]
        if "error" not in fq and fq:
            deltas = {d: round(fq[d] - fp[d], 4) for d in ("wordsim353", "simlex999")}
            ok = all(abs(v) <= 0.01 for v in deltas.values())
            out.append(f"fully quantized MiniLM within 0.01 Spearman of FP32: {'yes' if ok else 'NO'} {deltas}; "
                       f"nonlinear coverage {fq['nonlinear_coverage']:.0%}; lint {fq['lint']}")
    if "smollm2" in res:
        m = res["smollm2"]["models"]
        rows = {k: v for k, v in m.items() if "full-int8" in k and "error" not in v}
        if rows:
            best = min(rows, key=lambda k: rows[k]["ppl"])
            out.append(f"fully quantized SmolLM2 within 3% of FP32 perplexity: "
                       f"{'yes' if rows[best]['ppl_vs_fp32'] <= 0.03 else 'NO'} (best: {best}, "
                       f"{rows[best]['ppl']:.2f} vs {m['fp32']['ppl']:.2f}, {rows[best]['ppl_vs_fp32']:+.1%})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer functions, samples and runs")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-anchors", action="store_true", help="no ORT quantize_static / ModelOpt")
    parser.add_argument("--smollm2-eval-windows", type=int, default=0,
                        help="SmolLM2 evaluation windows of 256 tokens (default 24; 4 with --quick)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for full_int8{,_quick}.json and .md")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown of an existing results file")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    start = time.perf_counter()
    res = {"quick": args.quick, "command": " ".join(["python scripts/bench_full_int8.py", *(argv or sys.argv[1:])]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
                      f"{__import__('onnxruntime').__version__}"}
    log("function level")
    res["functions"] = function_table(FUNCTION_NAMES)  # every function, also in --quick (seconds)
    if not args.skip_minilm:
        log("all-MiniLM-L6-v2")
        res["minilm"] = run_minilm(args)
    if not args.skip_smollm2:
        log("SmolLM2-135M")
        res["smollm2"] = run_smollm2(args)
    res["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "full_int8_quick" if args.quick else "full_int8"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(res))
    log(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
