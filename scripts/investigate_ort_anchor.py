"""Why ONNX Runtime's quantize_static wrecks all-MiniLM-L6-v2, and what ORT's int8 CPU path is worth.

Reproduces, with numbers, the findings behind our `--target ort-cpu` profile and our BERT handling:
  1. the additive attention mask (Where(mask, 0, finfo(float32).min) -> Add -> Softmax) gets Q/DQ
     with scale 3.4e38/127, which rounds every attention score to 0;
  2. ORT's Entropy / Percentile / Distribution calibrators crash on that same constant;
  3. what is left once the mask is excluded: per-tensor outliers in the residual stream;
  4. batch-1 CPU latency of FP32 vs symmetric-int8 QDQ vs uint8/int8 QDQ, and which QDQ ORT fuses.

Run: python scripts/investigate_ort_anchor.py   (about 5 minutes on 2 cores; writes
.cache/reports/ort_anchor_findings.json). Needs nothing but the project venv.
"""

from __future__ import annotations

import collections
import json
import subprocess
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from benchlib import anchors, latency
from benchlib.latency import interleaved_latency
from onnxq_models import images, minilm, mobilenet_v2, text_data
from onnxq_models.cache import cache_dir

OUT = cache_dir("investigate_ort")
CALIB_SENTENCES, CALIB_LENGTH, WORD_LENGTH = 128, 32, 16


def minilm_calibration() -> dict[str, np.ndarray]:
    """128 calibration-split Wikipedia sentences, padded/truncated to 32 tokens (most rows padded)."""
    sentences = text_data.wiki_sentences("calib")
    pick = np.random.default_rng(0).choice(len(sentences), CALIB_SENTENCES, replace=False)
    return minilm.tokenize([sentences[i] for i in pick], max_length=CALIB_LENGTH)


def spearman(model_path) -> dict[str, float]:
    session = latency.cpu_session(model_path)
    return {name: round(text_data.word_similarity_spearman(
        lambda words: minilm.embed(session, words, max_length=WORD_LENGTH), name), 4)
        for name in text_data.WORD_SETS}


def score(result: anchors.AnchorResult) -> dict:
    """Spearman of a quantizer's output, or its error when the quantizer failed."""
    return spearman(result.output) if result.ok else {"error": result.error.splitlines()[-1]}


def huge_scales(model_path, threshold: float = 1e3) -> list[tuple[str, float]]:
    """(quantized tensor, scale) for every QuantizeLinear whose scale exceeds threshold."""
    graph = onnx.load(str(model_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return [(n.input[0], float(inits[n.input[1]].max())) for n in graph.node
            if n.op_type == "QuantizeLinear" and float(inits[n.input[1]].max()) > threshold]


def mask_nodes(model_path) -> dict[str, list[str]]:
    """Names of the nodes on the additive-mask path of the exported MiniLM."""
    graph = onnx.load(str(model_path)).graph
    return {
        "attention_add": [n.name for n in graph.node if n.op_type == "Add" and n.name.endswith("attention/self/Add")],
        "softmax": [n.name for n in graph.node if n.op_type == "Softmax"],
        "where": [n.name for n in graph.node if n.op_type == "Where"],
    }


def mask_constant(model_path) -> dict:
    """The float constant that Where selects for padded keys, and what consumes the Where output."""
    graph = onnx.load(str(model_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    where = next(n for n in graph.node if n.op_type == "Where" and any(
        c.op_type == "Add" for c in graph.node if n.output[0] in c.input))
    values = {}
    for name in where.input[1:]:
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            values[name] = float(numpy_helper.to_array(node.attribute[0].t))
    consumers = sorted({c.op_type for c in graph.node if where.output[0] in c.input})
    return {"where": where.name, "branch_constants": values, "consumers": consumers}


def calibrator_crash_tensor(model_path, calib, method: str, preprocess: bool) -> dict:
    """Run one ORT calibrator, recording every tensor whose histogram numpy refuses."""
    from onnxruntime.quantization import calibrate

    found = []
    collector = calibrate.HistogramCollector
    originals = {name: getattr(collector, name) for name in ("collect_value", "collect_absolute_value")}

    def tracing(original):
        def run(self, name_to_arr):
            first_error = None
            for tensor, arrays in name_to_arr.items():
                try:
                    original(self, {tensor: arrays})
                except ValueError as exc:
                    flat = np.concatenate([np.asarray(a).ravel() for a in arrays])
                    found.append({"tensor": tensor, "min": float(flat.min()), "max": float(flat.max())})
                    first_error = first_error or exc
            if first_error:
                raise first_error
        return run

    for name, original in originals.items():
        setattr(collector, name, tracing(original))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow notice, the symptom itself
            result = anchors.ort_quantize(model_path, calib, OUT / f"minilm_{method}_{preprocess}.onnx",
                                          calibrate=method, preprocess=preprocess)
    finally:
        for name, original in originals.items():
            setattr(collector, name, original)
    row = {"method": method, "preprocess": preprocess, "ok": result.ok}
    if result.ok:
        row["spearman"] = spearman(result.output)
    else:
        row.update(error=result.error.splitlines()[-1], offending_tensors=found)
    return row


def residual_outliers(calib) -> list[dict]:
    """Per LayerNorm input: abs max, which channel holds it, and the share of values an int8
    per-tensor step (absmax/127) rounds to zero. Computed in FP32 with PyTorch on the calibration rows."""
    import torch

    model, seen = minilm.load_model(), {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in calib.items()})
    for h in hooks:
        h.remove()
    valid = torch.from_numpy(calib["attention_mask"]).bool()
    rows = []
    for name, x in seen.items():
        v = x[valid].abs()
        absmax = float(v.max())
        rows.append({"layernorm": name, "absmax": round(absmax, 1), "channel": int(v.amax(0).argmax()),
                     "median_abs": round(float(v.median()), 3),
                     "share_rounded_to_zero": round(float((v < absmax / 254).float().mean()), 2)})
    return rows


def fused_ops(model_path) -> dict[str, int]:
    """Op counts after ORT's CPU graph optimisation: shows which QDQ groups became integer kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(OUT / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    keep = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "MatMulIntegerToFloat", "QGemm",
            "Conv", "MatMul", "QuantizeLinear", "DequantizeLinear", "Transpose")
    return {k: counts[k] for k in keep if counts[k]}


def main() -> None:
    report: dict = {}
    report["cpu"] = subprocess.run("lscpu | grep -i -E 'model name|flags'", shell=True, check=False,
                                   capture_output=True, text=True).stdout.strip()
    flags = report["cpu"].split()
    report["cpu_int8_features"] = {f: f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")}

    model, calib = minilm.cached_onnx(), minilm_calibration()
    report["calibration"] = {"rows": CALIB_SENTENCES, "tokens": CALIB_LENGTH,
                             "padded_rows": int((calib["attention_mask"].min(1) == 0).sum())}
    report["mask_constant"] = mask_constant(model)
    report["fp32"] = spearman(model)
    print(json.dumps({k: report[k] for k in ("cpu_int8_features", "mask_constant", "fp32")}, indent=1), flush=True)

    # 1. The ORT flow as documented (pre-process, then symmetric int8 QDQ, MinMax).
    base = anchors.ort_quantize(model, calib, OUT / "minilm_s8_pt.onnx")
    report["ort_s8_pt_minmax"] = {"spearman": score(base), "notes": base.notes,
                                  "huge_scales": huge_scales(base.output) if base.ok else None}
    print("ORT s8 per-tensor MinMax:", json.dumps(report["ort_s8_pt_minmax"], indent=1), flush=True)

    # 2. Exclusions. nodes_to_exclude on the Adds alone changes nothing: Softmax (quantizable)
    #    re-quantizes its input, which is the Add output. The whole mask path must go.
    nodes = mask_nodes(model)
    variants = {
        "exclude attention Add": nodes["attention_add"],
        "exclude attention Add + Softmax": nodes["attention_add"] + nodes["softmax"],
        "exclude attention Add + Softmax + Where": nodes["attention_add"] + nodes["softmax"] + nodes["where"],
    }
    report["exclusions"] = {}
    for i, (label, excluded) in enumerate(variants.items()):
        r = anchors.ort_quantize(model, calib, OUT / f"minilm_excl{i}.onnx", nodes_to_exclude=excluded)
        report["exclusions"][label] = {"spearman": score(r), "huge_scales": r.ok and len(huge_scales(r.output))}
        print(label, report["exclusions"][label], flush=True)
    unpadded = {k: v[calib["attention_mask"].min(1) == 1] for k, v in calib.items()}
    r = anchors.ort_quantize(model, unpadded, OUT / "minilm_unpadded_calib.onnx")
    report["calibrated_without_padding"] = {"rows": len(unpadded["input_ids"]), "spearman": score(r),
                                            "huge_scales": r.ok and len(huge_scales(r.output))}
    print("calibration rows without padding only:", report["calibrated_without_padding"], flush=True)

    # 3. With the mask path excluded, one op type at a time: where the rest of the loss is.
    masked = variants["exclude attention Add + Softmax + Where"]
    report["one_op_type"] = {}
    for op in ("MatMul", "Add", "Mul", "LayerNormalization", "Gather"):
        r = anchors.ort_quantize(model, calib, OUT / f"minilm_only_{op}.onnx", op_types_to_quantize=[op],
                                 nodes_to_exclude=masked)
        report["one_op_type"][op] = score(r)
        print("only", op, report["one_op_type"][op], flush=True)
    report["residual_outliers"] = residual_outliers(calib)
    for row in report["residual_outliers"]:
        print(row)

    # 4. The histogram calibrators.
    report["calibrators"] = [calibrator_crash_tensor(model, calib, method, pre)
                             for method in ("entropy", "percentile", "distribution") for pre in (False, True)]
    mm = anchors.ort_quantize(model, calib, OUT / "minilm_entropy_matmul.onnx", calibrate="entropy",
                              op_types_to_quantize=["MatMul"])
    report["entropy_matmul_only"] = score(mm)
    for row in report["calibrators"]:
        print(row, flush=True)
    print("entropy, MatMul only:", report["entropy_matmul_only"], flush=True)

    # 5. Latency at batch 1 and what ORT fuses, MobileNetV2 and MiniLM.
    mnv2, mnv2_calib = mobilenet_v2.cached_onnx(), {"input": images.crops("calib", 128, seed=0)}
    report["latency_ms"], report["fused_ops"] = {}, {}
    for label, path, calib_set, feeds in (
        ("mobilenet_v2", mnv2, mnv2_calib, {"input": images.center_crop("chelsea")}),
        ("minilm_seq128", model, calib, minilm.tokenize(["The quick brown fox jumps over the lazy dog."] * 1, 128)),
    ):
        variants = {"fp32": path}
        for tag, kw in (("s8s8_per_tensor", {}), ("s8s8_per_channel", {"per_channel": True}),
                        ("u8s8_per_channel", {"per_channel": True, "symmetric_activations": False})):
            r = anchors.ort_quantize(path, calib_set, OUT / f"{label}_{tag}.onnx", **kw)
            if r.ok:
                variants[tag] = r.output
            else:
                print(label, tag, "failed:", r.error.splitlines()[-1], flush=True)
        report["fused_ops"][label] = {tag: fused_ops(p) for tag, p in variants.items() if tag != "fp32"}
        report["latency_ms"][label] = {f"{t}_threads": interleaved_latency(variants, feeds, threads=t) for t in (1, 2)}
        print(label, json.dumps(report["latency_ms"][label]), json.dumps(report["fused_ops"][label]), flush=True)

    path = cache_dir("reports") / "ort_anchor_findings.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print("written", path)


if __name__ == "__main__":
    main()
