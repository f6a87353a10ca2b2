"""Design tuning (not a test, not a benchmark): SmolLM2-135M perplexity on the dev windows for a recipe
with some pass options changed, one variant per call, rows appended to a results file.

    python scripts/tune_smollm2.py --recipe transformer-w4a8 [--set quantize.head_bits=0 ...]
                                   [--label NAME] [--calib 16] [--windows 16] [--out scripts/results/smollm2_w4a8_dev]

Dev windows only (smollm2.eval_windows): the benchmarks report on the test windows, which no variant
here sees. `--set PASS.OPTION=VALUE` changes one option of a pass the recipe names (VALUE is read as
JSON when it parses, as a string otherwise), validated as a recipe's would be. Each call quantizes once
(calibration windows from the calibration articles), measures perplexity, and appends a row (label,
changes, perplexity, increase over FP32 on the same windows, quantize seconds) to <out>.json and
rewrites <out>.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from onnxq.api import quantize
from onnxq.pipeline import load_recipe
from onnxq.pipeline.recipes import with_options
from onnxq_models import smollm2


def parse_change(text: str) -> tuple[str, str, object]:
    target, _, raw = text.partition("=")
    pass_name, _, option = target.partition(".")
    if not (pass_name and option and raw):
        raise SystemExit(f"--set {text!r}: expected PASS.OPTION=VALUE, e.g. quantize.head_bits=8")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return pass_name, option, value


def recipe_with_changes(recipe: str, changes: list[tuple[str, str, object]]) -> list:
    _, passes = load_recipe(recipe)
    names = {p.name for p in passes}
    missing = sorted({name for name, _, _ in changes} - names)
    if missing:
        raise SystemExit(f"recipe {recipe} has no pass {', '.join(missing)} (it has {', '.join(sorted(names))})")
    out = []
    for p in passes:
        own = {option: value for name, option, value in changes if name == p.name}
        out.append(with_options(p, **own) if own else p)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["# SmolLM2-135M on the dev windows: recipe variants", "",
             ("Rows appended by `python scripts/tune_smollm2.py --recipe R --set PASS.OPTION=VALUE ...`, one call per "
              "row, with the row's recipe and changes. Perplexity on dev windows (`smollm2.eval_windows`), never the "
              "benchmarks' test windows."), "",
             "| label | recipe | changes | calibration windows | dev windows | ppl | vs FP32 | quantize s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["changes"].items()) or "-"
        lines.append(f"| {r['label']} | {r['recipe']} | {changes} | {r['calib_windows']} | {r['dev_windows']} | "
                     f"{r['ppl']} | {r['ppl_increase_pct']:+.2f}% | {r['quantize_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="transformer-w4a8")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="PASS.OPTION=VALUE")
    parser.add_argument("--label", default="")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--windows", type=int, default=16, help="dev windows of 256 tokens")
    parser.add_argument("--out", default="scripts/results/smollm2_w4a8_dev")
    args = parser.parse_args(argv)
    changes = [parse_change(c) for c in args.changes]
    steps = recipe_with_changes(args.recipe, changes)
    windows = smollm2.eval_windows(args.windows)
    fp32 = smollm2.cached_onnx()
    fp32_ppl = smollm2.perplexity(str(fp32), windows)["ppl"]
    with tempfile.TemporaryDirectory(prefix="tune-smollm2-") as tmp:
        output = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        quantize(str(fp32), smollm2.calibration_feeds(args.calib), output=output, recipe=steps, batch_size=1,
                 show_progress=False, log=lambda *_: None)
        seconds = time.perf_counter() - start
        ppl = smollm2.perplexity(str(output), windows)["ppl"]
    row = {"label": args.label or ", ".join(args.changes) or args.recipe, "recipe": args.recipe,
           "changes": {f"{n}.{o}": v for n, o, v in changes}, "calib_windows": args.calib, "dev_windows": args.windows,
           "fp32_ppl": round(fp32_ppl, 3), "ppl": round(ppl, 3), "ppl_increase_pct": round(100 * (ppl / fp32_ppl - 1), 2),
           "quantize_s": round(seconds, 1)}
    out_json = Path(args.out + ".json")
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    rows.append(row)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(rows))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
