"""Benchmark (not a test): learned post-training quantization against round-to-nearest, GPTQ and the anchors.

    python scripts/bench_learned.py [--sections mobilenet,repvgg,lm] [--iterations 500] [--quick]
                                    [--out scripts/results/learned] [--only LABEL,LABEL]

Sections (one run writes <out>.json and <out>.md with a table per section):

* mobilenet: MobileNetV2 (ImageNet weights), per-tensor INT8 activations, weights per channel and per
  tensor at 8 and 4 bits, each rounded to nearest, by GPTQ, AdaRound and FlexRound (block
  reconstruction, `learn_iterations` per block), beside ORT quantize_static (s8 per tensor and per
  channel, u8s8 per channel) and ModelOpt INT8. Metric: top-1 agreement with FP32 on the dev split (300
  crops of 5 photos: what design choices were tuned on) and on the test split (1012 crops of 23 other
  photos that nothing was tuned on), top-5 agreement on test; calibration: 128 crops of 6 further photos.
* repvgg: the re-parameterised RepVGG (Fashion-MNIST) at per-tensor W8A8 without and with the cfws pass,
  and with cfws + AdaRound; accuracy on the 10,000 test images against FP32's.
* lm: all-MiniLM-L6-v2 and SmolLM2-135M at W4A8 and W4A4 (the transformer-w4a8/-w4a4 recipes: rotation,
  smoothing) with round-to-nearest, GPTQ and FlexRound; MiniLM: WordSim-353 Spearman; SmolLM2:
  perplexity on 32 windows of 256 tokens of held-out articles (`--quick`: fewer). QSUR (the
  quantization-space utilisation of every linear layer's input, onnxq.stats.qsur) of each quantized
  model where its activations are quantized (after the recipe's transforms), beside FP32's on the same
  layers.

Every row reports its quantize wall time, the machine part learning ran on (cpu/cuda) and the TensorRT
lint verdict (W4A4 fails it by design: INT4 activations).

Split runs: learning wants a GPU and the anchors their own environments. `--anchors-to DIR` runs the
anchors here and leaves their models, their times, the FP32 model and the photos in DIR; `--anchors-from
DIR` (on the GPU machine, with ONNXQ_PHOTO_DIR=DIR/photos) then quantizes with onnxq and evaluates every
row, the anchors' saved models included, in one run on the same crops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxq
from benchlib import anchors, log, only_filter
from benchlib.facts import lint_verdict
from onnxq.ir.modelio import load_model
from onnxq.pipeline import load_recipe
from onnxq.pipeline.recipes import with_options
from onnxq.pipeline.registry import pass_class

SELECTED = [only_filter("")]
ROUNDINGS = ("nearest", "gptq", "adaround", "flexround")


def learn_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def recipe_with(recipe: str, *, before_quantize: list | None = None, **quantize_options) -> list:
    """A built-in recipe's passes with the quantize step's options changed (and passes put before it)."""
    _, passes = load_recipe(recipe)
    out = []
    for p in passes:
        if p.name == "quantize":
            out += list(before_quantize or [])
            p = with_options(p, **quantize_options)
        elif p.name == "upgrade_opset" and quantize_options.get("weight_bits") == 4:
            p = with_options(p, opset=21)  # INT4 Q/DQ needs opset 21
        out.append(p)
    return out


def timed_onnxq(source: Path, calib, output: Path, passes: list, **kw) -> dict:
    notes: list[str] = []
    start = time.perf_counter()
    onnxq.quantize(source, calib, output=output, recipe=passes, show_progress=False,
                   log=lambda line, *_: notes.append(str(line)) if "learned" in str(line) else None, **kw)
    return {"path": output, "quantize_s": round(time.perf_counter() - start, 1), "notes": "; ".join(notes)[:200]}


def timed_anchor(fn, source: Path, calib, output: Path, **kw) -> dict:
    result = fn(source, calib, output, **kw)
    if not result.ok:
        raise RuntimeError(result.error.strip().splitlines()[-1])
    return {"path": result.output, "quantize_s": round(result.seconds, 1), "notes": "; ".join(result.notes)}


def run_rows(section: str, quantizers: dict[str, Callable[[], dict]], evaluate: Callable[[Path], dict],
             rows: list[dict], report: Callable[[], None]) -> None:
    """Each selected quantizer: quantize, evaluate, lint; a failure is the row's, not the benchmark's."""
    for label, quantize in quantizers.items():
        if not SELECTED[0](label):
            continue
        log(f"[{section}] {label} ...")
        try:
            info = quantize()
            row = {"quantizer": label, **evaluate(info["path"]), "quantize_s": info["quantize_s"],
                   **lint_verdict(load_model(info["path"])), "notes": info.get("notes", "")}
        except Exception as exc:  # a row's failure, not the benchmark's
            row = {"quantizer": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        log(f"[{section}]", row)
        rows.append(row)
        report()


# ------------------------------------------------------------------------------------------------ MobileNetV2

ANCHORS = {
    "ORT quantize_static s8 per-tensor": (anchors.ort_quantize, {}),
    "ORT quantize_static s8 per-channel": (anchors.ort_quantize, {"per_channel": True}),
    "ORT quantize_static u8s8 per-channel": (anchors.ort_quantize, {"per_channel": True, "symmetric_activations": False}),
    "ModelOpt INT8": (anchors.modelopt_quantize, {}),
}


def mobilenet_data(quick: bool):
    from onnxq_models import images

    calib = {"input": images.crops("calib", 32 if quick else 128)}
    splits = {"dev": images.crops("dev", 60 if quick else 300), "test": images.crops("test", 92 if quick else 1012)}
    return calib, splits


def save_anchors(folder: Path, quick: bool) -> None:
    """Run the anchors on MobileNetV2 here; leave their models, times, the FP32 model and the photos in `folder`."""
    from onnxq_models import images, mobilenet_v2

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "mobilenet_v2.onnx"
    shutil.copyfile(mobilenet_v2.cached_onnx(), fp32)
    images.export_photos(folder / "photos")
    calib, _ = mobilenet_data(quick)
    saved = {"quick": quick}
    for label, (fn, kw) in ANCHORS.items():
        log(f"[mobilenet] {label} (saved for a later run) ...")
        file = folder / f"anchor_{len(saved) - 1}.onnx"
        try:
            with tempfile.TemporaryDirectory() as tmp:  # the anchors' working copies stay out of the folder
                info = timed_anchor(fn, fp32, calib, Path(tmp) / file.name, **kw)
                shutil.copyfile(info["path"], file)
            saved[label] = {"file": file.name, "quantize_s": info["quantize_s"], "notes": info["notes"]}
        except Exception as exc:  # a row's failure, not the benchmark's
            saved[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    (folder / "anchors.json").write_text(json.dumps(saved, indent=1) + "\n")


def mobilenet_rows(args, report) -> list[dict]:
    if args.anchors_from:  # the photos travel with the saved anchors
        os.environ.setdefault("ONNXQ_PHOTO_DIR", str(Path(args.anchors_from) / "photos"))
    from onnxq_models import mobilenet_v2

    source = Path(args.anchors_from) / "mobilenet_v2.onnx" if args.anchors_from else mobilenet_v2.cached_onnx()
    calib, splits = mobilenet_data(args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench-learned-"))

    def logits(path, x):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)])

    reference = {name: logits(source, x) for name, x in splits.items()}

    def evaluate(path):
        out = {}
        for name, x in splits.items():
            got, ref = logits(path, x), reference[name]
            out[f"top1_{name}"] = round(float((got.argmax(1) == ref.argmax(1)).mean()), 4)
        top5 = np.argsort(-logits(path, splits["test"]), axis=1)[:, :5]
        out["top5_test"] = round(float((top5 == reference["test"].argmax(1)[:, None]).any(1).mean()), 4)
        return out

    def onnxq_row(bits: int, weights: str, rounding: str):
        def go():
            passes = recipe_with("default", weights=weights, weight_bits=bits, rounding=rounding,
                                 learn_iterations=args.iterations, learn_regulariser=args.learn_regulariser)
            info = timed_onnxq(source, calib, work / f"w{bits}_{weights}_{rounding}.onnx", passes)
            info["notes"] = f"learned on {learn_device()}; " + info["notes"] if rounding in ("adaround", "flexround") \
                else info["notes"]
            return info
        return go

    quantizers = {f"onnxq W{bits}A8 {weights} {rounding}": onnxq_row(bits, weights, rounding)
                  for bits in (8, 4) for weights in ("per-channel", "per-tensor") for rounding in ROUNDINGS}
    if args.anchors_from:
        saved = json.loads((Path(args.anchors_from) / "anchors.json").read_text())
        if saved.pop("quick") != args.quick:
            raise SystemExit("--anchors-from: the anchors were calibrated with a different --quick setting")

        def saved_row(label):
            def go():
                if "error" in saved[label]:
                    raise RuntimeError(saved[label]["error"])
                return {"path": Path(args.anchors_from) / saved[label]["file"], "quantize_s": saved[label]["quantize_s"],
                        "notes": "quantized on the CPU machine (--anchors-to); " + saved[label].get("notes", "")}
            return go
        quantizers.update({label: saved_row(label) for label in saved})
    else:
        quantizers.update({label: (lambda fn=fn, kw=kw, i=i: timed_anchor(fn, source, calib, work / f"anchor{i}.onnx", **kw))
                           for i, (label, (fn, kw)) in enumerate(ANCHORS.items())})
    rows = [{"quantizer": "FP32", "top1_dev": 1.0, "top1_test": 1.0, "top5_test": 1.0}]
    run_rows("mobilenet", quantizers, evaluate, rows, lambda: report(rows))
    return rows


# ------------------------------------------------------------------------------------------------ RepVGG

def repvgg_rows(args, report) -> list[dict]:
    from onnxq_models import fashion_mnist, repvgg

    fp32 = repvgg.cached_onnx()
    calib = {"input": fashion_mnist.load("train")[0][:512]}
    images, labels = fashion_mnist.load("test")
    work = Path(tempfile.mkdtemp(prefix="bench-learned-repvgg-"))

    def logits(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": images[i:i + 500]})[0] for i in range(0, len(images), 500)])

    reference = logits(fp32).argmax(-1)

    def evaluate(path):
        out = logits(path)
        return {"accuracy": round(repvgg.accuracy(out, labels), 4), "agreement": round(float((out.argmax(-1) == reference).mean()), 4)}

    def row(weights: str, cfws: bool, rounding: str = "nearest"):
        before = [pass_class("cfws")()] if cfws else []
        return lambda: timed_onnxq(fp32, calib, work / f"{weights}_{cfws}_{rounding}.onnx",
                                   recipe_with("default", before_quantize=before, weights=weights, rounding=rounding,
                                               learn_iterations=args.iterations), batch_size=32)

    quantizers = {"onnxq W8A8 per-tensor": row("per-tensor", False),
                  "onnxq W8A8 per-tensor + cfws": row("per-tensor", True),
                  "onnxq W8A8 per-tensor + cfws + adaround": row("per-tensor", True, "adaround"),
                  "onnxq W8A8 per-channel": row("per-channel", False),
                  "onnxq W8A8 per-channel + cfws": row("per-channel", True)}
    rows = [{"quantizer": "FP32", **evaluate(fp32)}]
    run_rows("repvgg", quantizers, evaluate, rows, lambda: report(rows))
    return rows


# ------------------------------------------------------------------------------------------------ LMs

def qsur_by_layer(path: Path, calib: dict) -> dict[str, float]:
    """QSUR (u, onnxq.stats.qsur) of every linear layer's input, by node name; in a quantized model read
    where its activation Q/DQ takes it, so after the recipe's transforms."""
    from onnxq.stats.qsur import model_utilisation

    n = len(next(iter(calib.values())))
    feeds = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]  # up to qsur.MAX_ROWS vectors are kept
    return model_utilisation(load_model(path), feeds)


def qsur_columns(layers: dict[str, float], reference: dict[str, float]) -> dict:
    """Mean u over the layers both models have (split_range's extra MatMuls are the quantized model's own),
    with FP32's mean over the same layers beside it."""
    common = [k for k in layers if k in reference and np.isfinite(layers[k]) and np.isfinite(reference[k])]
    if not common:
        return {}
    return {"qsur": round(float(np.mean([layers[k] for k in common])), 4),
            "qsur_fp32": round(float(np.mean([reference[k] for k in common])), 4)}


def lm_rows(args, report) -> list[dict]:
    from benchlib.minilm_task import minilm_task
    from onnxq_models import smollm2

    rows: list[dict] = []

    def minilm():
        task = minilm_task(args.quick)
        return task.fp32, task.calib, 16, lambda p: {k: round(v, 4) for k, v in task.quality(p).items()}

    def smollm2_model():
        windows, fp32_ppl = smollm2.test_windows(4 if args.quick else 32), []

        def perplexity(path):
            ppl = smollm2.perplexity(str(path), windows)["ppl"]
            fp32_ppl[:] = fp32_ppl or [ppl]  # the first model evaluated is FP32
            return {"ppl": round(ppl, 3), "ppl_increase_pct": round(100 * (ppl / fp32_ppl[0] - 1), 2)}
        return smollm2.cached_onnx(), smollm2.calibration_feeds(2 if args.quick else 16), 1, perplexity

    # each built only when one of its rows is selected (an export takes minutes the first time)
    models = {"MiniLM": minilm, "SmolLM2": smollm2_model}
    work = Path(tempfile.mkdtemp(prefix="bench-learned-lm-"))
    variants = [(recipe, rounding) for recipe in ("transformer-w4a8", "transformer-w4a4")
                for rounding in ("nearest", "gptq", "flexround")]

    def label(model_name: str, recipe: str, rounding: str) -> str:
        return f"{model_name} {recipe.split('-')[1].upper()} {rounding}"

    for model_name, build in models.items():
        if not (SELECTED[0](f"{model_name} FP32") or any(SELECTED[0](label(model_name, *v)) for v in variants)):
            continue
        source, calib, batch, evaluate = build()
        reference = qsur_by_layer(source, calib)
        rows.append({"quantizer": f"{model_name} FP32", **evaluate(source), **qsur_columns(reference, reference)})
        report(rows)

        def row(recipe: str, rounding: str, model_name=model_name, source=source, calib=calib, batch=batch):
            return lambda: timed_onnxq(source, calib, work / f"{model_name}_{recipe}_{rounding}.onnx",
                                       recipe_with(recipe, rounding=rounding, learn_iterations=args.iterations),
                                       batch_size=batch)

        quantizers = {label(model_name, recipe, rounding): row(recipe, rounding) for recipe, rounding in variants}
        def evaluate_with_qsur(path, evaluate=evaluate, calib=calib, reference=reference):
            return {**evaluate(path), **qsur_columns(qsur_by_layer(path, calib), reference)}

        run_rows("lm", quantizers, evaluate_with_qsur, rows, lambda: report(rows))
    return rows


# ------------------------------------------------------------------------------------------------ report

COLUMNS = {"mobilenet": ["top1_dev", "top1_test", "top5_test"], "repvgg": ["accuracy", "agreement"],
           "lm": ["ppl", "ppl_increase_pct", "wordsim353", "cosine_to_fp32", "qsur", "qsur_fp32"]}
TITLES = {"mobilenet": "MobileNetV2: top-1 agreement with FP32 (dev: 300 crops of 5 photos; test: 1012 crops of 23 photos; "
                       "top5_test: FP32's class among the quantized model's top 5)",
          "repvgg": "RepVGG on Fashion-MNIST (10,000 test images), per-tensor INT8 activations",
          "lm": "LMs at W4A8 / W4A4: SmolLM2 perplexity (test windows), MiniLM WordSim-353 Spearman"}


def markdown(results: dict, command: str) -> str:
    lines = ["# Learned PTQ: round-to-nearest vs GPTQ vs AdaRound vs FlexRound, beside the anchors", "",
             f"`{command}`. {results['setup']}", ""]
    for section, rows in results["sections"].items():
        cols = COLUMNS[section]
        lines += [f"## {TITLES[section]}", "", "| quantizer | " + " | ".join(cols) + " | quantize s | TensorRT lint | notes |",
                  "|---" * (len(cols) + 4) + "|"]
        for r in rows:
            cells = [f"{r[c]}" if c in r else "" for c in cols]
            lines.append(f"| {r['quantizer']} | " + " | ".join(cells) + f" | {r.get('quantize_s', '')} | {r.get('lint', '')} | "
                         f"{r.get('error') or r.get('notes', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def merge(files: list[str], out: str) -> int:
    runs = [json.loads(Path(f).read_text()) for f in files]
    setups = sorted({run["setup"] for run in runs})
    if len(setups) > 1:
        raise SystemExit("--merge: the runs differ in setup, their rows do not belong in one table:\n  " + "\n  ".join(setups))
    sections: dict[str, list[dict]] = {}
    for run in runs:
        for section, rows in run["sections"].items():
            have = sections.setdefault(section, [])
            for row in rows:
                at = next((i for i, r in enumerate(have) if r["quantizer"] == row["quantizer"]), None)
                if at is None:
                    have.append(row)
                elif "error" in have[at] and "error" not in row:  # a later run's result beats an earlier failure
                    have[at] = row
    results = {"setup": setups[0] + f"; rows joined from {len(runs)} runs of the same code and data",
               "sections": sections}
    Path(out + ".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    Path(out + ".md").write_text(markdown(results, "python scripts/bench_learned.py --merge " + " ".join(
        Path(f).name for f in files) + f" --out {out}"))
    print(Path(out + ".md").read_text())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="mobilenet,repvgg,lm")
    parser.add_argument("--iterations", type=int, default=500, help="learn_iterations per block (adaround/flexround)")
    parser.add_argument("--learn-regulariser", type=float, default=1000.0,
                        help="AdaRound's λ (learn_regulariser) for the mobilenet rows (default 1000)")
    parser.add_argument("--quick", action="store_true", help="fewer crops, windows and calibration samples")
    parser.add_argument("--only", default="", help="comma-separated substrings of the row labels to run")
    parser.add_argument("--out", default="scripts/results/learned", help="output path without extension")
    parser.add_argument("--anchors-to", help="run the MobileNetV2 anchors here and save them (and the photos) in DIR")
    parser.add_argument("--anchors-from", help="evaluate the anchors saved by --anchors-to instead of running them")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="join the rows of several runs' .json files (one machine's calls cut short by its time "
                             "limit) into <out>.json/.md, first run's row first")
    args = parser.parse_args(argv)
    SELECTED[0] = only_filter(args.only)
    if args.merge:
        return merge(args.merge, args.out)
    if args.anchors_to:
        save_anchors(Path(args.anchors_to), args.quick)
        return 0
    setup = (f"learn_iterations {args.iterations} per block, learning on {learn_device()}; activations per-tensor INT8 "
             "(W4A4: INT4)" + ("; --quick" if args.quick else "")
             + (f"; AdaRound λ {args.learn_regulariser:g}" if args.learn_regulariser != 1000.0 else ""))
    results = {"setup": setup, "sections": {}}
    command = "python scripts/bench_learned.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])

    def report(section):
        def write(rows):
            results["sections"][section] = rows
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
            Path(args.out + ".md").write_text(markdown(results, command))
        return write

    runners = {"mobilenet": mobilenet_rows, "repvgg": repvgg_rows, "lm": lm_rows}
    for section in args.sections.split(","):
        runners[section](args, report(section))
    if not results["sections"]:
        raise SystemExit(f"--only {args.only!r} selects no row of the sections {args.sections}")
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
