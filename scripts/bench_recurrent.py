"""Recurrent LMs: RWKV (RWKVQuant's hybrid VQ/scalar weights) and Mamba (MambaQuant's rotations), beside
ORT and ModelOpt, in one run.

    python scripts/bench_recurrent.py --json scripts/results/recurrent.json [--quick] [--skip-anchors]

Models: the byte-level RWKV-4 and Mamba LMs of models/rwkv_lm.py and models/mamba_lm.py (committed
checkpoints), exported with a dynamic sequence length. Keys of --json are `<model>_<variant>`, each with
"ppl" (perplexity per byte on the test split), quantize seconds, output size, TensorRT lint:

* fp32;
* w8a8_plain, w4a8_plain: the same quantize settings without the seed method;
* w8a8, w4a8: with it (mamba-w8a8 / mamba-w4a8: KLT+Hadamard stream rotation and smooth-fused rotation at
  out_proj; rwkv-w8a8 / rwkv-w4a8: proxy-chosen codebooks for half (W8A8) or a quarter (W4A8) of the layers, the rest scalar);
* mamba_w4a8_hadamard, mamba_w4a8_klt: the rotation ablations (Hadamard only, KLT without smoothing);
* ort_quantize_static, modelopt: the anchors, several documented settings each, the best kept.

Data: calibration 64 windows x 128 bytes of the enwiki calibration articles; the test split is 64 windows x
128 bytes spread over the second half of the held-out articles, which no design choice used (the recipes
were tuned on windows of the first half). A .md table is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchlib import lm_anchors, log, repo_relative
from benchlib.facts import lint_verdict

CALIB_WINDOWS, WINDOW, TEST_WINDOWS = 64, 128, 64

# ablations written as recipes: the seed method's passes taken out, or one of them changed
PLAIN = {
    "mamba_w8a8_plain": """passes: [lift_constants, fold_constants, {upgrade_opset: {opset: 19}}, fold_norm, scan_precision,
  {quantize: {calibrator: mse, weights: per-channel, weight_calibrator: mse, rounding: gptq, float_residual: true,
   embeddings: float}}]""",
    "mamba_w4a8_plain": """passes: [lift_constants, fold_constants, {upgrade_opset: {opset: 21}}, fold_norm, scan_precision,
  {quantize: {calibrator: max, weights: per-channel, weight_calibrator: mse, rounding: gptq, weight_bits: 4,
   block_size: 32, float_residual: true, embeddings: float}}]""",
    "mamba_w4a8_hadamard": """passes: [lift_constants, fold_constants, {upgrade_opset: {opset: 21}}, fold_norm,
  {rotate: {heads: false}}, scan_precision, {smooth_fused_rotate: {smooth: false, basis: hadamard}},
  {quantize: {calibrator: max, weights: per-channel, weight_calibrator: mse, rounding: gptq, weight_bits: 4,
   block_size: 32, float_residual: true, embeddings: float}}]""",
    "mamba_w4a8_klt": """passes:
  - include: mamba-w4a8
    override: {smooth_fused_rotate: {smooth: false}}""",
    "rwkv_w8a8_plain": """passes:
  - include: rwkv-w8a8
    override: {vq_weights: {vector_share: 0.0, mixes: false}}""",
    "rwkv_w4a8_plain": """passes:
  - include: rwkv-w4a8
    override: {vq_weights: {vector_share: 0.0, mixes: false}}""",
}
ROWS = {"mamba": ["w8a8_plain", "w8a8", "w4a8_plain", "w4a8_hadamard", "w4a8_klt", "w4a8"],
        "rwkv": ["w8a8_plain", "w8a8", "w4a8_plain", "w4a8"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file; a .md table is written beside it")
    parser.add_argument("--models", default="mamba,rwkv")
    parser.add_argument("--quick", action="store_true", help="few windows (a smoke run, not results)")
    parser.add_argument("--skip-anchors", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.json)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-recurrent-") as tmp:
        for name in args.models.split(","):
            run_model(name, Path(tmp), results, out, args.quick, args.skip_anchors)
    return 0


def run_model(name: str, folder: Path, results: dict, out: Path, quick: bool, skip_anchors: bool) -> None:
    import onnxruntime as ort

    from onnxq_models import byte_lm, mamba_lm, moe_lm, rwkv_lm

    module = {"mamba": mamba_lm, "rwkv": rwkv_lm}[name]
    model = byte_lm.export_onnx(module.load(), folder / f"{name}.onnx")
    heldout = moe_lm.corpus("heldout")
    n_cal, n_test = (8, 8) if quick else (CALIB_WINDOWS, TEST_WINDOWS)
    test = moe_lm.windows(heldout[len(heldout) // 2:], n_test, WINDOW)
    calib = {"input_ids": moe_lm.windows(moe_lm.corpus("calib"), n_cal, WINDOW)}

    def ppl(path) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return round(2.0 ** byte_lm.bits_per_byte(lambda ids: session.run(None, {"input_ids": ids})[0], test), 4)

    results[f"{name}_fp32"] = {"ppl": ppl(model), "size_mb": _size(model), "test_windows": n_test, "window": WINDOW}
    log(f"{name}_fp32", results[f"{name}_fp32"])
    for variant in ROWS[name]:
        key = f"{name}_{variant}"
        recipe = f"{name}-{variant}" if key not in PLAIN else _recipe_file(folder, key)
        results[key] = _onnxq_row(model, calib, recipe, folder / f"{key}.onnx", ppl)
        log(key, {k: v for k, v in results[key].items() if k != "proxy"})
        _write(results, out)
    if not skip_anchors:
        for anchor, tries in (("ort_quantize_static", lm_anchors.ort_tries()), ("modelopt", lm_anchors.modelopt_tries())):
            results[f"{name}_{anchor}"] = lm_anchors.best_anchor(model, calib, tries, folder, ppl, extra=_facts)
            log(f"{name}_{anchor}", results[f"{name}_{anchor}"])
            _write(results, out)


def _recipe_file(folder: Path, key: str) -> str:
    path = folder / f"{key}.yaml"
    path.write_text(f"description: {key} (bench_recurrent ablation)\n{PLAIN[key]}\n")
    return str(path)


def _onnxq_row(model: Path, calib: dict, recipe: str, output: Path, ppl) -> dict:
    from onnxq.api import quantize

    start = time.perf_counter()
    quantize(str(model), calib, output=str(output), recipe=recipe, batch_size=8, show_progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return {"ppl": ppl(output), "quantize_seconds": round(seconds, 1), **_facts(output)}


def _facts(path: Path) -> dict:
    """Size on disk, TensorRT lint, and what vq_weights chose (bits per weight, layers per kind)."""
    from onnxq.ir.modelio import load_model

    model = load_model(str(path))
    facts = {"size_mb": _size(path), **lint_verdict(model)}
    vq_line = next((v for k, v in model.metadata_props.items() if k.endswith(".vq_weights")), None)
    if vq_line:
        facts["vq_weights"] = vq_line.split("|", 1)[-1].strip()[:300]
    return facts


def _size(path: Path) -> float:
    return round(sum(p.stat().st_size for p in [Path(path), *Path(path).parent.glob(Path(path).name + ".data")]) / 1e6, 2)


def _write(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| row | ppl (per byte) | vs FP32 | size MB | lint | quantize s |", "|---|---|---|---|---|---|"]
    for key, row in results.items():
        if row.get("ppl") is None:
            continue
        fp32 = results.get(f"{key.split('_')[0]}_fp32", {}).get("ppl")
        lines.append(lm_anchors.ppl_row(key, row, fp32, str(row.get("size_mb", ""))))
    lines += ["", f"Command: `python scripts/bench_recurrent.py {' '.join(sys.argv[1:])}`; results in {repo_relative(out)}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
