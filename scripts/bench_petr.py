#!/usr/bin/env python3
"""Benchmark (not a test) of PETR-tiny quantization: the position-embedding passes and recipes.

From the committed checkpoints on the CPU: models/checkpoints/petr_tiny_lid.pt (original PE),
petr_tiny_qfpe_qat.pt (the QFPE fine-tune continued quantization-aware; what the petr-w8a8 and
petr-full-int8 recipes swap in) and petr_tiny_qfpe.pt (the plain QFPE fine-tune, rows `*_qfpe_ptq`):

* FP32: the original-PE (LID) model and both QFPE models, each exported in form A (PE computed in the
  graph from img2lidar) and run in ONNX Runtime;
* per-tensor W8A8 (weights and activations per tensor, as FQ-PETR) of the original-PE model with
  onnxq's default recipe (no PE handling); with recipe petr-w8a8-pe-fold (pe_fold + smooth + recentre
  + QANS; `_no_smooth_recentre`: without those two, the recipe before they were added); with
  petr-w8a8 (the qfpe pass swaps in the QFPE checkpoint's PE and weights, + QANS); fully quantized
  with petr-full-int8 (QFPE + QANS + DULUT + integer LayerNorm); ONNX Runtime quantize_static and
  NVIDIA ModelOpt (scripts/benchlib/anchors.py) on the original-PE model, and again on the QFPE-QAT
  model (`_qfpe`), so that the QFPE rows have anchors on the same model too;
* with --extras also: per-channel weights, the recipes without QANS, QFPE + pe_fold, the default
  recipe on the PE-as-input export (form B), and the default recipe with only the attention
  products in float (what the PE passes add on top of that).

Every quantized model is calibrated on the same 32 train-split scenes (never val), evaluated on the
validation split (300 scenes) with models/petr_eval.py (nuScenes-style mAP and NDS-like score),
linted against the TensorRT Q/DQ rules, and timed (ORT CPU, median per-scene latency of the evaluation
loop, batch = one scene of 6 images). The ranges of the image features ("memory"), the PE and the
key-projection input are measured on 16 val scenes before and after each rewrite, with the INT8 step
the quantized model gives the key-projection input.

Run:  python scripts/bench_petr.py --json scripts/results/petr.json [--extras] [--val-scenes N] [--variants K,K|none]
Writes FILE (one entry per variant, each {"mAP", "NDS", ...}), FILE with .md (table and notes) and
FILE with .meta.json (timings, versions, ranges). Derived models go to .cache/petr_bench/.
The val split is cached under .cache/petr_synth/; an empty cache is re-rendered deterministically
(about 0.06 s a scene on two idle cores, ~1 s a scene on a busy machine).
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

from benchlib import REPO, facts, log, repo_relative

WORK = REPO / ".cache" / "petr_bench"
CHECKPOINTS = REPO / "models" / "checkpoints"
CALIB_SCENES = 32
RANGE_SCENES = 16
K_PROJ = "/model/layers.0/cross_attn/k_proj/MatMul"

QFPE_CHECKPOINT = "petr_tiny_qfpe_qat.pt"  # what petr-w8a8 and petr-full-int8 swap in (their weights file ships with them)
QFPE_PTQ_CHECKPOINT = "petr_tiny_qfpe.pt"
QFPE_PTQ_WEIGHTS = CHECKPOINTS / "petr_tiny_qfpe.npz"  # its weights file for the qfpe pass (scripts/train_petr.py writes it)
REQUIRED = ("fp32_pe", "fp32_qfpe", "w8a8_naive", "w8a8_pe_fold", "w8a8_qfpe", "full_int8", "ort_quantize_static", "modelopt")


# ------------------------------------------------------------------------------------------------
# data and models


def load_data(val_scenes: int):
    from onnxq_models import petr_data, petr_export

    start = time.perf_counter()
    val = petr_data.load_split("val", val_scenes)
    val_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train = petr_data.load_split("train", CALIB_SCENES)
    calib_seconds = time.perf_counter() - start
    inv = petr_export.rig_img2lidar()
    calib = {"images": petr_data.images_to_input(train.images).numpy(),
             "img2lidar": np.repeat(inv, CALIB_SCENES, axis=0)}
    return val, calib, {"val_load_seconds": round(val_seconds, 1), "calib_load_seconds": round(calib_seconds, 1)}


def export_models() -> dict[str, Path]:
    from onnxq_models import petr, petr_export

    paths = {}
    # "qfpe" is the recipes' checkpoint (QFPE fine-tuned quantization-aware); "qfpe_ptq" the plain QFPE fine-tune
    for key, checkpoint in (("lid", "petr_tiny_lid.pt"), ("qfpe", QFPE_CHECKPOINT), ("qfpe_ptq", QFPE_PTQ_CHECKPOINT)):
        model, _ = petr.load_checkpoint(CHECKPOINTS / checkpoint)
        for form in ("in_graph", "input"):
            paths[f"{key}_{form}"] = petr_export.export_onnx(model, WORK / f"petr_tiny_{key}_{form}.onnx", form)
        if key == "lid":
            paths["pos_embed_lid"] = WORK / "pos_embed_lid.npy"
            np.save(paths["pos_embed_lid"], petr_export.compute_pos_embed(model, petr_export.rig_img2lidar()))
    return paths


# ------------------------------------------------------------------------------------------------
# evaluation


def evaluate(path: Path, val, pos_embed: np.ndarray | None = None) -> dict:
    """mAP, NDS-like score and TP errors on the val scenes; median per-scene ORT CPU latency."""
    from onnxq.runtime.session import session
    from onnxq_models import petr_data, petr_eval, petr_export

    sess = session(path)
    inputs = {i.name for i in sess.get_inputs()}
    inv = petr_export.rig_img2lidar()
    detections, times = [], []
    for i in range(len(val.images)):
        feed = {"images": petr_data.images_to_input(val.images[i:i + 1]).numpy()}
        if "img2lidar" in inputs:
            feed["img2lidar"] = inv
        if "pos_embed" in inputs:
            feed["pos_embed"] = pos_embed
        start = time.perf_counter()
        logits, boxes = sess.run(["cls_logits", "boxes"], feed)
        times.append(time.perf_counter() - start)
        detections.append(petr_eval.decode_detections(logits[0], boxes[0]))
    truths = [petr_eval.GroundTruth(b.numpy(), l.numpy()) for b, l in zip(val.gt_boxes, val.gt_labels)]
    result = petr_eval.evaluate(detections, truths, petr_data.CLASS_NAMES)
    return {"mAP": round(result.mAP, 4), "NDS": round(result.NDS, 4), "mATE": round(result.mATE, 3),
            "mASE": round(result.mASE, 3), "mAOE": round(result.mAOE, 3),
            "AP_by_threshold": {th: round(float(np.mean([result.ap[c][float(th)] for c in result.ap])), 4)
                                for th in ("0.5", "1.0", "2.0", "4.0")},
            "latency_ms": round(1e3 * float(np.median(times)), 1)}


def model_facts(path: Path) -> dict:
    """The facts every benchmark reports, and the INT8 scale of the first key projection's input."""
    from onnxq.ir.modelio import load_model

    result = facts.model_facts(path)
    scale = key_input_scale(load_model(str(path)))
    if scale is not None:
        result["k_proj_input_scale"] = round(scale, 5)
    return result


def key_input_scale(model) -> float | None:
    """The per-tensor INT8 scale of the first key projection's activation input, if quantized."""
    from onnxq.ir.graph import const_array

    node = next((n for n in model.graph if n.name == K_PROJ), None)
    dq = node.inputs[0].producer() if node is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = const_array(dq.inputs[1])
    return float(scale.reshape(-1)[0]) if scale is not None and scale.size == 1 else None


def pe_ranges(path: Path, val, folded_bias_absmax: float | None = None) -> dict:
    """|memory|, |PE| and |key-projection input| on the first val scenes of an FP32 graph (form A)."""
    from onnxq.analysis.petr_pe import find_pe, stats
    from onnxq.ir.modelio import load_model
    from onnxq.runtime.session import exposing, session
    from onnxq_models import petr_data, petr_export

    model = load_model(str(path))
    try:
        site = find_pe(model)
        add = site.adds[0]
        names = {"memory": add.memory.name, "pe": add.pe.name, "k_proj_input": add.add.outputs[0].name}
    except Exception:
        node = next(n for n in model.graph if n.name == K_PROJ)
        names = {"memory": node.inputs[0].name, "k_proj_input": node.inputs[0].name}
    sess = session(exposing(model, list(dict.fromkeys(names.values()))))
    inputs = {i.name for i in sess.get_inputs()}
    values: dict[str, list] = {k: [] for k in names}
    for i in range(RANGE_SCENES):
        feed = {"images": petr_data.images_to_input(val.images[i:i + 1]).numpy(), "img2lidar": petr_export.rig_img2lidar()}
        out = sess.run(list(names.values()), {k: v for k, v in feed.items() if k in inputs})
        for key, v in zip(names, out):
            values[key].append(v)
    result = {k: {s: round(x, 3) for s, x in stats(np.concatenate(v)).items()} for k, v in values.items()}
    if folded_bias_absmax is not None:
        result["pe_in_folded_bias"] = {"absmax": folded_bias_absmax}
    result["pe_to_memory_absmax"] = round(result["pe"]["absmax"] / result["memory"]["absmax"], 2) if "pe" in result else 0.0
    return result


# ------------------------------------------------------------------------------------------------
# quantization



def recipe_steps(name: str, *, qans: bool = True, weights: str = "per-tensor", fold_after_qfpe: bool = False,
                 attention_float: bool = False, rounding: str | None = None, weights_file: Path | None = None,
                 weight_calibrator: str | None = None, without: tuple[str, ...] = ()) -> list:
    """A built-in recipe's passes with the quantize step's weight granularity (and ablations: `without`
    drops the named passes)."""
    from onnxq.pipeline import load_recipe
    from onnxq.pipeline.recipes import with_options

    _, passes = load_recipe(name)
    out = []
    for step in passes:
        if step.name == "quantize":
            changes = {"weights": weights, "rounding": rounding or step.rounding,
                       "weight_calibrator": weight_calibrator or step.weight_calibrator}
            if attention_float:
                changes["exclude"] = list(attention_products())
            step = with_options(step, **changes)
        if step.name == "qfpe" and weights_file:
            step = with_options(step, checkpoint=str(weights_file))
        if (step.name == "qans" and not qans) or step.name in without:
            continue
        out.append(step)
        if step.name == "fold_batchnorm" and fold_after_qfpe:
            from onnxq.pipeline import make_pass

            out.append(make_pass("pe_fold"))
    return out


def attention_products() -> list[str]:
    from onnxq.pipeline import load_recipe

    _, passes = load_recipe("petr-w8a8")
    return next(p for p in passes if p.name == "quantize").exclude


def onnxq_variant(source: Path, calib: dict, out: Path, steps: list) -> dict:
    from onnxq.api import quantize
    from onnxq.ir.modelio import load_model
    from onnxq.pipeline import read_record

    start = time.perf_counter()
    proto = quantize(str(source), calib, output=str(out), recipe=steps, show_progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    record = read_record(load_model(proto))
    summaries = {r["name"]: r["summary"] for r in record if r["name"] in ("pe_fold", "qfpe", "qans", "dulut", "integer_ops")}
    if "checkpoint" in summaries.get("qfpe", {}):  # results name no machine paths
        summaries["qfpe"]["checkpoint"] = repo_relative(summaries["qfpe"]["checkpoint"])
    return {"quantize_seconds": round(seconds, 1), "passes": [r["name"] for r in record], "pass_summaries": summaries}


def anchor_variant(kind: str, source: Path, calib: dict, out: Path) -> dict:
    from benchlib import anchors

    with tempfile.TemporaryDirectory(prefix="petr-anchor-") as tmp, anchors.working_dir(tmp):
        if kind == "ort":
            result = anchors.ort_quantize(source, calib, out)  # symmetric INT8, per-tensor weights, MinMax
        else:
            result = anchors.modelopt_quantize(source, calib, out)  # ModelOpt int8 (entropy, its own placement)
    info = {"quantizer": result.name, "quantize_seconds": round(result.seconds, 1)}
    if result.notes:
        info["notes"] = result.notes
    if not result.ok:
        info["error"] = result.error
    return info


# ------------------------------------------------------------------------------------------------


def run(args) -> tuple[dict, dict]:
    import onnxruntime
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    val, calib, timing = load_data(args.val_scenes)
    log(f"data: {len(val.images)} val scenes ({timing['val_load_seconds']} s), {CALIB_SCENES} train scenes for calibration "
        f"({timing['calib_load_seconds']} s)")
    paths = export_models()
    lid, qfpe_model = paths["lid_in_graph"], paths["qfpe_in_graph"]
    results: dict[str, dict] = {}
    meta = {"command": "python scripts/bench_petr.py " + " ".join(args.argv), "timing": timing,
            "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "val_scenes": len(val.images),
            "calibration": f"{CALIB_SCENES} train-split scenes (indices 0..{CALIB_SCENES - 1}), one fixed camera rig"}

    def record(key, path, extra=None, fp32_source=None):
        start = time.perf_counter()
        entry = evaluate(path, val, np.load(paths["pos_embed_lid"]) if "form_b" in key else None)
        entry.update(extra or {})
        if key.startswith("fp32"):
            entry["lint"] = "n/a (FP32)"
        else:
            entry.update(model_facts(path))
        entry["eval_seconds"] = round(time.perf_counter() - start, 1)
        results[key] = entry
        log(f"{key:<24} mAP {entry['mAP']:.4f}  NDS {entry['NDS']:.4f}  {entry['latency_ms']:.0f} ms  lint {entry['lint']}  "
            f"[{time.perf_counter() - t0:.0f} s]")

    # FP32
    record("fp32_pe", lid)
    record("fp32_qfpe", qfpe_model)
    record("fp32_qfpe_ptq", paths["qfpe_ptq_in_graph"])

    q = WORK / "quantized"
    q.mkdir(exist_ok=True)
    variants = [
        ("w8a8_naive", lid, recipe_steps("default")),
        ("w8a8_pe_fold", lid, recipe_steps("petr-w8a8-pe-fold")),
        ("w8a8_qfpe", lid, recipe_steps("petr-w8a8")),
        ("full_int8", lid, recipe_steps("petr-full-int8")),
        ("w8a8_pe_fold_nearest", lid, recipe_steps("petr-w8a8-pe-fold", rounding="nearest")),
        ("w8a8_pe_fold_no_smooth_recentre", lid, recipe_steps("petr-w8a8-pe-fold", without=("smooth", "recentre"))),
        ("w8a8_qfpe_gptq_mse", lid, recipe_steps("petr-w8a8", rounding="gptq", weight_calibrator="mse")),
        # the plain QFPE fine-tune, with the weight rounding that suits a checkpoint not trained for it
        ("w8a8_qfpe_ptq", lid, recipe_steps("petr-w8a8", weights_file=QFPE_PTQ_WEIGHTS, rounding="gptq", weight_calibrator="mse")),
        ("full_int8_qfpe_ptq", lid, recipe_steps("petr-full-int8", weights_file=QFPE_PTQ_WEIGHTS, rounding="gptq",
                                                 weight_calibrator="mse")),
    ]
    if args.extras:
        variants += [
            ("w8a8_naive_attention_float", lid, recipe_steps("default", attention_float=True)),
            ("w8a8_naive_form_b", paths["lid_input"], recipe_steps("default")),
            ("w8a8_pe_fold_no_qans", lid, recipe_steps("petr-w8a8-pe-fold", qans=False)),
            ("w8a8_pe_fold_no_recentre", lid, recipe_steps("petr-w8a8-pe-fold", without=("recentre",))),
            ("w8a8_qfpe_no_qans", lid, recipe_steps("petr-w8a8", qans=False)),
            ("w8a8_qfpe_pe_fold", lid, recipe_steps("petr-w8a8", fold_after_qfpe=True)),
            ("w8a8_naive_per_channel", lid, recipe_steps("default", weights="per-channel")),
            ("w8a8_pe_fold_per_channel", lid, recipe_steps("petr-w8a8-pe-fold", weights="per-channel")),
            ("w8a8_qfpe_per_channel", lid, recipe_steps("petr-w8a8", weights="per-channel")),
        ]
    if args.variants is not None:
        variants = [v for v in variants if v[0] in args.variants]
    for key, source, steps in variants:
        out = q / f"{key}.onnx"
        data = calib if "form_b" not in key else {"images": calib["images"],
                                                  "pos_embed": np.repeat(np.load(paths["pos_embed_lid"]), CALIB_SCENES, 0)}
        try:
            info = onnxq_variant(source, data, out, steps)
        except Exception as exc:
            results[key] = {"mAP": None, "NDS": None, "error": f"{type(exc).__name__}: {exc}"}
            log(f"{key}: FAILED {exc}")
            continue
        info["recipe"] = {"w8a8_naive": "default", "w8a8_pe_fold": "petr-w8a8-pe-fold", "w8a8_qfpe": "petr-w8a8",
                          "full_int8": "petr-full-int8"}.get(key, "ablation (see .md)")
        record(key, out, info)

    if not args.skip_anchors:
        # on the original-PE model (what the pe_fold rows quantize) and on the QFPE-QAT model (what the
        # QFPE rows quantize): each onnxq row has anchors on the same model
        for key, kind, model in (("ort_quantize_static", "ort", lid), ("modelopt", "modelopt", lid),
                                 ("ort_quantize_static_qfpe", "ort", qfpe_model), ("modelopt_qfpe", "modelopt", qfpe_model)):
            out = q / f"{key}.onnx"
            info = anchor_variant(kind, model, calib, out)
            if "error" in info:
                results[key] = {"mAP": None, "NDS": None, **info}
                log(f"{key}: FAILED {info['error'][-300:]}")
                continue
            record(key, out, info)

    # ranges before and after the rewrites (FP32 graphs) and what the quantized key input gets
    ranges = {"fp32_pe": pe_ranges(lid, val), "fp32_qfpe": pe_ranges(qfpe_model, val)}
    fold = results.get("w8a8_pe_fold", {}).get("pass_summaries", {}).get("pe_fold", {})
    folded = WORK / "lid_pe_folded_fp32.onnx"
    from onnxq.api import quantize as run_recipe

    run_recipe(str(lid), calib, output=str(folded), recipe=recipe_steps("petr-w8a8-pe-fold")[:5], show_progress=False,
               log=lambda *_: None)
    ranges["pe_fold"] = pe_ranges(folded, val, fold.get("folded_bias_absmax"))
    for key, entry in results.items():
        source = {"w8a8_naive": "fp32_pe", "ort_quantize_static": "fp32_pe", "modelopt": "fp32_pe",
                  "w8a8_pe_fold": "pe_fold", "w8a8_pe_fold_no_qans": "pe_fold", "w8a8_pe_fold_per_channel": "pe_fold",
                  "w8a8_qfpe": "fp32_qfpe", "full_int8": "fp32_qfpe", "w8a8_qfpe_no_qans": "fp32_qfpe",
                  "w8a8_qfpe_per_channel": "fp32_qfpe", "w8a8_naive_per_channel": "fp32_pe",
                  "w8a8_naive_attention_float": "fp32_pe"}.get(key)
        scale = entry.get("k_proj_input_scale")
        if source and scale:
            r = ranges[source]
            entry["k_proj_input_absmax_fp32"] = r["k_proj_input"]["absmax"]
            entry["memory_int8_steps"] = round(r["memory"]["p99.9"] / scale, 1)  # steps the features' p99.9 spans
    for key, value in ranges.items():
        if key in results:
            results[key]["ranges"] = value
    meta["ranges"] = ranges
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"total {meta['total_seconds']} s")
    return results, meta


def markdown(results: dict, meta: dict) -> str:
    fp = {k: results.get(k, {}).get("mAP") for k in ("fp32_pe", "fp32_qfpe", "fp32_qfpe_ptq")}
    ref_of = lambda k: ("fp32_qfpe_ptq" if k.endswith("_ptq") else
                        "fp32_qfpe" if ("qfpe" in k or k.startswith("full_int8")) else "fp32_pe")
    lines = [f"# PETR-tiny quantization benchmark ({meta['val_scenes']} val scenes)", "",
             (f"`{meta['command']}`, {meta['machine']}, total {meta['total_seconds']:.0f} s. Calibration: {meta['calibration']}. "
             "W8A8 rows: per-tensor weights and activations unless the name says per_channel; "
             "petr-w8a8-pe-fold rounds weights with GPTQ (`_nearest`: to nearest; `_no_smooth_recentre`: without the smooth and recentre passes); petr-w8a8 and petr-full-int8 "
             "round the QAT checkpoint's weights to nearest at max scales (`_gptq_mse`: GPTQ at mse scales); "
             "`_ptq` rows: the plain QFPE checkpoint, GPTQ at mse scales."), "",
             "| variant | mAP | NDS | Δ mAP (pts) vs its FP32 | AP@0.5/1/2/4 m | k_proj input absmax (FP32) | features' INT8 steps at k_proj | lint (TensorRT) | ORT CPU ms | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in results.items():
        if e.get("mAP") is None:
            lines.append(f"| {key} | failed | | | | | | | | {e.get('error', '')[:120]} |")
            continue
        ref = fp.get(ref_of(key))
        delta = "" if key.startswith("fp32") or ref is None else f"{100 * (e['mAP'] - ref):+.1f}"
        aps = "/".join(f"{v:.2f}" for v in e.get("AP_by_threshold", {}).values())
        kin = e.get("k_proj_input_absmax_fp32", e.get("ranges", {}).get("k_proj_input", {}).get("absmax", ""))
        lines.append(f"| {key} | {e['mAP']:.4f} | {e['NDS']:.4f} | {delta} | {aps} | {kin} | {e.get('memory_int8_steps', '')} | "
                     f"{e.get('lint', '')} | {e['latency_ms']:.0f} | {e.get('quantize_seconds', '')} |")
    lines += ["", "## Ranges (16 val scenes, FP32 graphs)", "",
              "| graph | memory absmax / p99.9 | PE absmax / p99.9 | k_proj input absmax / p99.9 | PE / memory |", "|---|---|---|---|---|"]
    for key, r in meta["ranges"].items():
        pe = f"{r['pe']['absmax']} / {r['pe']['p99.9']}" if "pe" in r else (
            f"folded into the key biases (bias absmax {r['pe_in_folded_bias']['absmax']})" if "pe_in_folded_bias" in r else "-")
        lines.append(f"| {key} | {r['memory']['absmax']} / {r['memory']['p99.9']} | {pe} | "
                     f"{r['k_proj_input']['absmax']} / {r['k_proj_input']['p99.9']} | {r.get('pe_to_memory_absmax', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="results file (one entry per variant)")
    p.add_argument("--val-scenes", type=int, default=300)
    p.add_argument("--extras", action="store_true", help="also per-channel weights and ablations (about twice as long)")
    p.add_argument("--skip-anchors", action="store_true", help="leave out ONNX Runtime quantize_static and ModelOpt")
    p.add_argument("--variants", type=lambda text: [v for v in text.split(",") if v and v != "none"],
                   help="run only these onnxq variants (comma-separated keys; 'none': FP32 and anchors only)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    results, meta = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    path.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1, default=str))
    path.with_suffix(".md").write_text(markdown(results, meta))
    log(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.meta.json')}")
    wanted = [k for k in REQUIRED if (args.variants is None or k in args.variants or k.startswith("fp32")
                                      or k in ("ort_quantize_static", "modelopt"))
              and not (args.skip_anchors and k in ("ort_quantize_static", "modelopt"))]
    missing = [k for k in wanted if results.get(k, {}).get("mAP") is None]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
