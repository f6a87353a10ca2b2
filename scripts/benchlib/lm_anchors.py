"""The anchors on a language model: ORT quantize_static and ModelOpt in their documented settings, the
best of each kept (lowest perplexity), every try listed; and the perplexity table row the LM benchmarks share."""

from __future__ import annotations

from pathlib import Path


def ort_tries() -> list[tuple[str, dict]]:
    return [("s8 per-tensor", {"per_channel": False}), ("s8 per-channel", {"per_channel": True}),
            # ORT's documented setting for transformers: the MatMuls only
            ("s8 per-channel, MatMul only", {"per_channel": True, "op_types_to_quantize": ["MatMul"]})]


def modelopt_tries() -> list[tuple[str, dict]]:
    return [("INT8 entropy (default)", {"calibration_method": "entropy"}), ("INT8 max", {"calibration_method": "max"})]


def best_anchor(model: Path, calib: dict, tries, folder: Path, ppl, extra=None) -> dict:
    """Quantize `model` with each (label, options) try; the one with the lowest `ppl(path)` and all tries.
    `extra(path) -> dict` adds facts about the kept model (lint, size)."""
    from benchlib import anchors

    tried, paths = {}, {}
    for label, options in tries:
        output = folder / f"anchor_{len(tried)}.onnx"
        if "calibration_method" in options:
            result = anchors.modelopt_quantize(model, calib, output, timeout_s=1200, **options)
        else:
            result = anchors.ort_quantize(model, calib, output, batch_size=8, **options)
        tried[label] = ({"ppl": ppl(output), "quantize_seconds": round(result.seconds, 1)} if result.ok else
                        {"error": (result.error or "failed").strip().splitlines()[-1][:200]})
        paths[label] = output
    ok = {k: v for k, v in tried.items() if "ppl" in v}
    if not ok:
        return {"ppl": None, "tried": tried}
    best = min(ok, key=lambda k: ok[k]["ppl"])
    return {**ok[best], "setting": best, "tried": tried, **(extra(paths[best]) if extra else {})}


def ppl_row(key: str, row: dict, fp32: float | None, middle: str) -> str:
    """| key (setting) | ppl | change vs FP32 | middle | lint | quantize s |"""
    change = f"{100 * (row['ppl'] / fp32 - 1):+.2f}%" if fp32 else ""
    label = key + (f" ({row['setting']})" if "setting" in row else "")
    return f"| {label} | {row['ppl']} | {change} | {middle} | {row.get('lint', '')} | {row.get('quantize_seconds', '')} |"
