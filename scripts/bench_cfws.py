"""Benchmark (not a test): coarse & fine weight splitting on a re-parameterised network.

    python scripts/bench_cfws.py [--out scripts/results/cfws]

Model: the small RepVGG of onnxq_models.repvgg, trained on Fashion-MNIST (Debian package
dataset-fashion-mnist) with 3×3, 1×1 and identity branches and exported with them merged into one
3×3 kernel per block, as a user would deploy it. Calibration: 512 training images. Evaluation: the
10,000 test images, which no design choice has seen (the pass's one option, the centre-tap ratio
that marks a merged kernel, keeps its default). Per row: top-1 accuracy, agreement with FP32, the
TensorRT lint verdict and the quantize time. Rows: FP32; onnxq W8A8 (default recipe) with per-tensor
and per-channel weights, each without and with `cfws` before `quantize`; ORT quantize_static (s8,
per tensor and per channel) and ModelOpt INT8 on the same model and data. Activations are per-tensor
INT8 everywhere. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxq
from benchlib import anchors
from benchlib.facts import lint_verdict
from onnxq.ir.modelio import load_model
from onnxq.pipeline import load_recipe
from onnxq.pipeline.registry import pass_class
from onnxq_models import fashion_mnist, repvgg


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i:i + 500]})[0] for i in range(0, len(images), 500)])


def recipe(cfws: bool) -> list:
    """The default recipe's passes, with cfws just before quantize when asked."""
    _, passes = load_recipe("default")
    if cfws:
        at = next(i for i, p in enumerate(passes) if p.name == "quantize")
        passes.insert(at, pass_class("cfws")())
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="scripts/results/cfws", help="output path without extension")
    args = parser.parse_args()
    fp32 = repvgg.cached_onnx()
    calib = {"input": fashion_mnist.load("train")[0][:512]}
    test_images, test_labels = fashion_mnist.load("test")
    reference = logits(fp32, test_images).argmax(-1)
    work = Path(tempfile.mkdtemp(prefix="bench-cfws-"))

    def onnxq_row(per_tensor: bool, cfws: bool):
        def go():
            out = work / f"onnxq_{'pt' if per_tensor else 'pc'}{'_cfws' if cfws else ''}.onnx"
            onnxq.quantize(fp32, calib, output=out, recipe=recipe(cfws), per_tensor=per_tensor, batch_size=32,
                           show_progress=False, log=lambda *_: None)
            return out
        return go

    def anchor_row(fn, name, **kw):
        def go():
            result = fn(fp32, calib, work / f"{name}.onnx", **kw)
            if not result.ok:
                raise RuntimeError(result.error.strip().splitlines()[-1])
            return result.output
        return go

    quantizers = {
        "onnxq W8A8 per-tensor": onnxq_row(True, False),
        "onnxq W8A8 per-tensor + cfws": onnxq_row(True, True),
        "onnxq W8A8 per-channel": onnxq_row(False, False),
        "onnxq W8A8 per-channel + cfws": onnxq_row(False, True),
        "ORT quantize_static s8 per-tensor": anchor_row(anchors.ort_quantize, "ort_pt"),
        "ORT quantize_static s8 per-channel": anchor_row(anchors.ort_quantize, "ort_pc", per_channel=True),
        "ModelOpt INT8": anchor_row(anchors.modelopt_quantize, "modelopt"),
    }
    rows = [{"quantizer": "FP32", "accuracy": repvgg.accuracy(logits(fp32, test_images), test_labels),
             "agreement": 1.0}]
    for label, quantize in quantizers.items():
        print(f"[repvgg] {label} ...", flush=True)
        start = time.perf_counter()
        try:
            path = quantize()
        except Exception as exc:  # a row's failure, not the benchmark's
            rows.append({"quantizer": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        out = logits(path, test_images)
        rows.append({"quantizer": label, "accuracy": repvgg.accuracy(out, test_labels),
                     "agreement": float((out.argmax(-1) == reference).mean()), "quantize_s": round(time.perf_counter() - start, 1),
                     **lint_verdict(load_model(path))})
    setup = ("RepVGG (6 blocks, branches merged) on Fashion-MNIST; calibration 512 training images, evaluation "
             "the 10,000 test images; activations per-tensor INT8")
    Path(args.out + ".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    lines = ["# Coarse & fine weight splitting (cfws) on a re-parameterised RepVGG", "",
             f"`python scripts/bench_cfws.py --out {args.out}`. {setup}.", "",
             "| quantizer | top-1 accuracy | agreement with FP32 | quantize s | TensorRT lint | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r.get('accuracy', float('nan')):.4f} | {r.get('agreement', float('nan')):.4f} | "
                     f"{r.get('quantize_s', '')} | {r.get('lint', '')} | {r.get('error', '')} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
