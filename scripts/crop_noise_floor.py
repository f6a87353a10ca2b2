"""Benchmark helper (not a test): how fragile FP32 MobileNetV2's top-1 is on the benchmark crops.

    python scripts/crop_noise_floor.py [--out scripts/results/mobilenet_noise_floor]

Top-1 agreement with FP32 is the image benchmark's metric (scripts/bench_learned.py). Where FP32's two
best classes are nearly tied, any perturbation flips the answer, whatever the quantizer. This reports,
per split (dev: 300 crops of 5 photos, test: 1012 crops of 23 photos), FP32's top-1/top-2 logit margin
and the agreement of FP32 with itself when Gaussian noise of 0.3 %, 1 % and 3 % of the inputs' standard
deviation is added to the input, and when only the input is rounded to INT8 (one scale for the whole
tensor, max calibration, as a quantized model's first Q does): a floor that no quantizer of the whole
network can be expected to beat. Beside it, onnxq's default W8A8 model (128 calibration crops of 6
other photos) as it is and with its activation Q/DQ pairs taken out (weights quantized, activations
float), to show which half of W8A8 costs what.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq

SPLITS = {"dev": 300, "test": 1012}
NOISE = (0.003, 0.01, 0.03)


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every activation QuantizeLinear → DequantizeLinear pair removed (weight DQs stay)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    quantizers = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"
                  and n.input[0] not in constants}
    bypass = {n.output[0]: quantizers[n.input[0]] for n in graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in quantizers}
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node  # copies: the field is cleared below
            if n.output[0] not in bypass and n.output[0] not in quantizers]
    for node in kept:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    kept += [onnx.helper.make_node("Identity", [bypass[o.name]], [o.name]) for o in graph.output if o.name in bypass]
    del graph.node[:]
    graph.node.extend(kept)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="scripts/results/mobilenet_noise_floor")
    args = parser.parse_args(argv)
    from onnxq_models import images, mobilenet_v2

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(mobilenet_v2.cached_onnx()), options, providers=["CPUExecutionProvider"])

    def logits(x, model=sess):
        return np.concatenate([model.run(None, {"input": x[i:i + 128]})[0] for i in range(0, len(x), 128)])

    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "w8a8.onnx"
        onnxq.quantize(mobilenet_v2.cached_onnx(), {"input": images.crops("calib", 128)}, output=quantized,
                       show_progress=False, log=lambda *_: None)
        w8a8 = onnx.load(str(quantized))
    variants = {"agreement_w8a8": w8a8, "agreement_weights_only": weights_only(onnx.ModelProto.FromString(
        w8a8.SerializeToString()))}
    variants = {k: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for k, m in variants.items()}

    rows = []
    for split, count in SPLITS.items():
        x = images.crops(split, count)
        ref = logits(x)
        top = np.sort(ref, axis=1)
        margin = top[:, -1] - top[:, -2]
        row = {"split": split, "crops": count, "median_margin": round(float(np.median(margin)), 3),
               "share_margin_below_0.1": round(float((margin < 0.1).mean()), 3)}
        rng = np.random.default_rng(0)
        for rel in NOISE:
            noisy = x + rng.normal(size=x.shape).astype(np.float32) * np.float32(rel * x.std())
            row[f"agreement_noise_{rel}"] = round(float((logits(noisy).argmax(1) == ref.argmax(1)).mean()), 4)
        scale = np.float32(np.abs(x).max() / 127)
        rounded = (np.clip(np.round(x / scale), -128, 127) * scale).astype(np.float32)
        row["agreement_input_int8"] = round(float((logits(rounded).argmax(1) == ref.argmax(1)).mean()), 4)
        for key, variant in variants.items():
            row[key] = round(float((logits(x, variant).argmax(1) == ref.argmax(1)).mean()), 4)
        rows.append(row)
        print(row)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    header = ["split", "crops", "median top-1/top-2 margin", "share of margins < 0.1",
              *(f"FP32 vs FP32 + {rel:.1%} noise" for rel in NOISE), "FP32 vs FP32 on INT8-rounded input",
              "onnxq W8A8 (default)", "its weights only"]
    lines = ["# MobileNetV2 FP32: how fragile top-1 is on the benchmark crops\n",
             "Command: `python scripts/crop_noise_floor.py`\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
