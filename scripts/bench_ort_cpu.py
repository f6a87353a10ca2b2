"""Benchmark of `--target ort-cpu` (not a test): ONNX Runtime CPU latency and accuracy of onnxq's
ort-cpu output against FP32 and ORT's own quantize_static, on the same models and data.

    python scripts/bench_ort_cpu.py [--quick] [--out scripts/results/ort_cpu]

Models: MobileNetV2 (top-1 agreement with FP32 on held-out photo crops), the PP-OCRv4 text
detector (mean |Δ| of the probability map and IoU of the text mask at PP-OCR's 0.3 threshold, on
crops of scikit-image's text pages) and the PP-OCR direction classifier (argmax agreement on text-
line crops, half of them turned 180°), both from the rapidocr-onnxruntime package.
Quantizers: onnxq --target ort-cpu (default recipe) and ORT quantize_static in its documented CPU
setting (UINT8 activations, INT8 per-channel weights, MinMax, quant_pre_process first, the model
converted to opset 13 first where older), in QDQ and in QOperator format.
Per model: what ORT's CPU provider leaves unfused in its optimized graph (DequantizeLinear left,
float compute ops left), and batch-1 latency with 1 and 2 intra-op threads: min and median over
all timed runs, runs interleaved between the models so load from other jobs hits all alike. On
a shared machine the minimum is the number to compare. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

import onnxq
from benchlib import anchors
from onnxq_models import images, mobilenet_v2, ppocr
from onnxq_models.cache import cache_dir

QLINEAR = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
           "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "QGemm",
           "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice", "Gather", "Identity",
         "Concat", "Shape", "Cast", "QuantizeLinear", "DequantizeLinear"}


def text_lines(n: int, seed: int) -> np.ndarray:
    """`n` (3, 48, 192) text-line crops of scikit-image's pages, PP-OCR-normalised; every other pair
    turned 180° (what the direction classifier tells apart)."""
    from skimage import data, transform

    pages = [np.asarray(data.page(), np.float32), np.asarray(data.text(), np.float32)]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 48, 192), np.float32)
    for i in range(n):
        page = pages[i % 2]
        h = int(rng.uniform(20, 60))
        w = min(4 * h, page.shape[1] - 1)
        y, x = rng.integers(0, page.shape[0] - h), rng.integers(0, page.shape[1] - w)
        crop = transform.resize(page[y:y + h, x:x + w], (48, 192), preserve_range=True, anti_aliasing=True)
        if i % 4 >= 2:
            crop = crop[::-1, ::-1]
        out[i] = (crop / 255.0 - 0.5) / 0.5
    return out


def session(path, threads: int = 0, optimized: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if optimized is not None:
        # EXTENDED: the saved graph then holds only standard and com.microsoft ops (no NCHWc layout ops)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def unfused(path: Path) -> dict:
    """What ORT's CPU provider runs: counts of integer kernels, DequantizeLinear and float compute ops."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized=optimized)
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    float_ops = {op: n for op, n in ops.items() if op not in QLINEAR and op not in MOVES}
    return {"dequantize_left": ops.get("DequantizeLinear", 0), "quantize_left": ops.get("QuantizeLinear", 0),
            "integer_kernels": {op: n for op, n in sorted(ops.items()) if op in QLINEAR},
            "float_ops": dict(sorted(float_ops.items()))}


def op_profile(path: Path, feed: dict, runs: int = 50) -> dict[str, float]:
    """Microseconds per run spent in each op type's kernels, from ORT's own profiler (1 thread); the
    profiler adds a little to every node, so compare op types, not totals with the latency columns."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.enable_profiling = 1, True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    spent: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"] / runs
    return {op: round(us, 1) for op, us in spent.most_common()}


def latency(paths: dict[str, Path], feed: dict, threads: int, rounds: int, runs: int) -> dict[str, dict]:
    """{name: {min_ms, median_ms}} over rounds × runs, models interleaved round by round."""
    sessions = {name: session(p, threads) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min_ms": round(float(np.min(t)), 2), "median_ms": round(float(np.median(t)), 2)}
            for name, t in times.items()}


def models(quick: bool, inputs: Path | None = None) -> dict:
    """name → (fp32 path, input name, calibration batch, evaluation batch, accuracy function)."""
    def top1(ref, out):
        return {"top1_agreement": round(float(np.mean(ref.argmax(1) == out.argmax(1))), 4)}

    def det_map(ref, out):
        mask_r, mask_o = ref > 0.3, out > 0.3
        union = np.logical_or(mask_r, mask_o).sum()
        return {"prob_map_mean_abs_diff": round(float(np.abs(ref - out).mean()), 5),
                "text_mask_iou": round(float(np.logical_and(mask_r, mask_o).sum() / max(union, 1)), 4)}

    n = 0.25 if quick else 1
    if inputs is not None:  # models and data saved by --save-inputs on another machine
        return {label: saved_inputs(inputs / _folder(label)) + (accuracy,)
                for label, accuracy in (("MobileNetV2", top1), ("PP-OCRv4 det", det_map), ("PP-OCR cls", top1))
                if (inputs / _folder(label)).is_dir()}
    folder = ppocr.det_model_path().parent
    return {
        "MobileNetV2": (mobilenet_v2.cached_onnx(), "input", images.crops("calib", int(128 * n)),
                        images.crops("eval", int(300 * n)), top1),
        "PP-OCRv4 det": (folder / "ch_PP-OCRv4_det_infer.onnx", "x", ppocr.text_images(int(16 * n) or 4, 320, seed=0),
                         ppocr.text_images(int(8 * n) or 2, 320, seed=1), det_map),
        "PP-OCR cls": (folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", text_lines(int(64 * n), seed=0),
                       text_lines(int(200 * n), seed=1), top1),
    }


def _folder(label: str) -> str:
    return label.replace(" ", "_")


def save_inputs(specs: dict, folder: Path) -> None:
    """Each model with its calibration and evaluation batches, for --inputs on a machine without the photo
    and text packages (the GPU machine's CPU has the VNNI int8 instructions this one lacks)."""
    import shutil

    for label, (fp32, input_name, calib, evaluation, _) in specs.items():
        target = folder / _folder(label)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fp32, target / "fp32.onnx")
        (target / "input.json").write_text(json.dumps(input_name))
        # float16 halves what travels; every quantizer on the other machine gets the same rounded samples
        np.savez(target / "data.npz", calib=calib.astype(np.float16), evaluation=evaluation.astype(np.float16))


def saved_inputs(folder: Path) -> tuple:
    data = np.load(folder / "data.npz")
    return (folder / "fp32.onnx", json.loads((folder / "input.json").read_text()),
            data["calib"].astype(np.float32), data["evaluation"].astype(np.float32))


def opset13(fp32: Path, folder: Path) -> Path:
    """The model for ORT's quantizer: converted to opset 13 when older, since per-channel QDQ needs
    DequantizeLinear's axis attribute (opset 13); ORT writes it regardless and its output then fails
    to load. onnxq upgrades the opset itself (recipe step upgrade_opset)."""
    model = onnx.load(str(fp32))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:
        return fp32
    path = folder / "fp32_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(model, 13), str(path))
    return path


def preprocessed(source: Path, folder: Path, notes: list[str]) -> Path:
    """ORT's quant_pre_process; where its symbolic shape inference fails, again without it (its
    documented option skip_symbolic_shape), noted."""
    from onnxruntime.quantization import quant_pre_process

    path = folder / "fp32_ort_preprocessed.onnx"
    try:
        quant_pre_process(str(source), str(path))
    except Exception as exc:
        quant_pre_process(str(source), str(path), skip_symbolic_shape=True)
        notes.append(f"quant_pre_process failed ({type(exc).__name__}); rerun with skip_symbolic_shape=True")
    return path


def ort_qoperator(source: Path, calib: dict, output: Path) -> float:
    """ORT quantize_static in QOperator format (QLinearConv etc. written directly), the same CPU
    setting as the QDQ row: UINT8 activations, INT8 per-channel weights, MinMax. Returns its wall time."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp, anchors.working_dir(tmp):
        start = time.perf_counter()
        quantize_static(str(source), str(output.resolve()), anchors._calibration_reader(calib, 8),
                        quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return time.perf_counter() - start


def _ort_rows(fp32, input_name, calib, out: Path, notes: list[str], paths: dict, quant_seconds: dict) -> None:
    """ORT quantize_static's QDQ and QOperator outputs, added to `paths` (failures to `quant_seconds`)."""
    ort_source = preprocessed(opset13(Path(fp32), out), out, notes)
    name = "ORT quantize_static QDQ u8s8 per-channel"
    result = anchors.ort_quantize(ort_source, {input_name: calib}, out / "ort_u8s8_pc.onnx", per_channel=True,
                                  symmetric_activations=False, batch_size=8, preprocess=False)
    if result.ok:
        paths[name] = result.output
        quant_seconds[name] = round(result.seconds, 1)
    else:
        quant_seconds[name] = f"failed: {result.error.strip().splitlines()[-1][:300]}"
    qoperator = "ORT quantize_static QOperator u8s8 per-channel"
    try:
        quant_seconds[qoperator] = round(ort_qoperator(ort_source, {input_name: calib}, out / "ort_qoperator.onnx"), 1)
        paths[qoperator] = out / "ort_qoperator.onnx"
    except Exception as exc:  # reported in the table, like a failed QDQ run
        quant_seconds[qoperator] = f"failed: {type(exc).__name__} {str(exc)[-200:]}"


def evaluate(path: Path, name: str, batch: np.ndarray) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, {name: batch[i:i + 8]})[0] for i in range(0, len(batch), 8)])


def bench_model(label, fp32, input_name, calib, evaluation, accuracy, out: Path, quick: bool,
                profile: bool = False, anchors_too: bool = True) -> dict:
    paths = {"FP32": Path(fp32)}
    quant_seconds = {}
    start = time.perf_counter()
    onnxq.quantize(fp32, {input_name: calib}, output=out / "onnxq_ort_cpu.onnx", target="ort-cpu",
                   show_progress=False, log=lambda *_: None)
    quant_seconds["onnxq --target ort-cpu"] = round(time.perf_counter() - start, 1)
    paths["onnxq --target ort-cpu"] = out / "onnxq_ort_cpu.onnx"
    notes: list[str] = []
    print(f"[{label}] onnxq {quant_seconds['onnxq --target ort-cpu']} s" + ("; ORT's quantizer ..." if anchors_too else ""),
          flush=True)
    if anchors_too:
        _ort_rows(fp32, input_name, calib, out, notes, paths, quant_seconds)
    for name in list(paths):  # a quantizer whose output ORT cannot load is reported, not timed
        try:
            session(paths[name])
        except Exception as exc:
            quant_seconds[name] = f"output does not load in ORT: {str(exc)[-200:]}"
            del paths[name]
    print(f"[{label}] accuracy and latency ...", flush=True)
    reference = evaluate(paths["FP32"], input_name, evaluation)
    feed = {input_name: evaluation[:1]}
    rows = {}
    timing = {t: latency(paths, feed, t, rounds=3 if quick else 5, runs=5 if quick else 12) for t in (1, 2)}
    for name, path in paths.items():
        row = {"accuracy": accuracy(reference, evaluate(path, input_name, evaluation)),
               "ort_graph": unfused(path), "quantize_s": quant_seconds.get(name)}
        if profile:
            row["kernel_us_per_op"] = op_profile(path, feed)
        for t in (1, 2):
            fp = timing[t]["FP32"]
            row[f"threads{t}"] = {**timing[t][name], "min_vs_fp32": round(timing[t][name]["min_ms"] / fp["min_ms"], 3),
                                  "median_vs_fp32": round(timing[t][name]["median_ms"] / fp["median_ms"], 3)}
        rows[name] = row
    rows["notes"] = notes
    for name, seconds in quant_seconds.items():
        if name not in rows:
            rows[name] = {"error": seconds}
    print(f"[{label}] done", flush=True)
    return rows


def markdown(results: dict, command: str) -> str:
    lines = ["# `--target ort-cpu`: ONNX Runtime CPU latency and accuracy", "",
             f"Command: `{command}`", "",
             ("Batch 1, CPUExecutionProvider, ORT_ENABLE_ALL; min and median over all timed runs (models "
             "interleaved). The machine was shared with other jobs: compare the min columns. "
             "'DQ left' / 'float ops' are read from ORT's own optimized graph (ORT_ENABLE_EXTENDED)."), ""]
    for model, rows in results["models"].items():
        lines += [f"## {model}", "",
                  ("| quantizer | accuracy | 1 thread min ms (×FP32) | 1 thread median ms | 2 threads min ms (×FP32) "
                  "| 2 threads median ms | DQ left | float ops left in ORT |"),
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            if name == "notes":
                continue
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
                continue
            acc = ", ".join(f"{k} {v}" for k, v in r["accuracy"].items())
            t1, t2, g = r["threads1"], r["threads2"], r["ort_graph"]
            floats = ", ".join(f"{k} {v}" for k, v in g["float_ops"].items()) or "-"
            lines.append(f"| {name} | {acc} | {t1['min_ms']} ({t1['min_vs_fp32']}) | {t1['median_ms']} | "
                         f"{t2['min_ms']} ({t2['min_vs_fp32']}) | {t2['median_ms']} | {g['dequantize_left']} | {floats} |")
        lines += [f"Note: {note}" for note in rows.get("notes", [])] + [""]
        profiled = {name: r["kernel_us_per_op"] for name, r in rows.items() if name != "notes" and "kernel_us_per_op" in r}
        if profiled:
            lines += ["Kernel time per run by op type (ORT profiler, 1 thread, µs; the profiler's own cost included):", ""]
            lines += [f"- {name}: " + ", ".join(f"{op} {us}" for op, us in list(ops.items())[:10]) for name, ops in profiled.items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and timed runs")
    parser.add_argument("--out", default="scripts/results/ort_cpu")
    parser.add_argument("--models", nargs="*", help="subset of the model names")
    parser.add_argument("--save-inputs", type=Path, help="write the models and data to this folder and stop")
    parser.add_argument("--onnxq-only", action="store_true", help="FP32 and onnxq rows only, no ORT quantizer")
    parser.add_argument("--profile", action="store_true", help="also ORT's kernel time per op type, per quantizer")
    parser.add_argument("--inputs", type=Path, help="take the models and data from a --save-inputs folder")
    args = parser.parse_args()
    if args.save_inputs:
        save_inputs({k: v for k, v in models(args.quick).items() if not args.models or k in args.models},
                    args.save_inputs)
        return
    work = cache_dir("bench_ort_cpu")
    results = {"onnxruntime": ort.__version__, "quick": args.quick, "models": {}}
    for label, spec in models(args.quick, args.inputs).items():
        if args.models and label not in args.models:
            continue
        folder = work / _folder(label)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{label}] ...", flush=True)
        results["models"][label] = bench_model(label, *spec, folder, args.quick, args.profile, not args.onnxq_only)
        write(results, Path(args.out), args)  # after every model, so a late failure keeps the rest
    print(Path(args.out).with_suffix(".md").read_text())


def write(results: dict, out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    command = "python scripts/bench_ort_cpu.py" + (" --quick" if args.quick else "") + (
        " --profile" if args.profile else "") + (" --onnxq-only" if args.onnxq_only else "") + (f" --inputs {args.inputs}" if args.inputs else "") + (
        f" --models {' '.join(repr(m) for m in args.models)}" if args.models else "")
    out.with_suffix(".md").write_text(markdown(results, command))


if __name__ == "__main__":
    main()
