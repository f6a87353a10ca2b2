"""The `onnxq report` page: one self-contained HTML file with hand-written inline SVG charts.

No script, no style sheet or font from elsewhere: the page opens offline. Every string that comes
from the model or the data (node and tensor names, pass summaries, lint messages) goes through
`html.escape`, so a node named `<script>` is shown, never run. Sections carry stable ids (summary,
passes, outputs, layers, activations, weights, outliers, float, lint, nonlinear) for readers and tests.
"""

from __future__ import annotations

import json
import math
from html import escape

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;margin-top:28px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 8px;text-align:left;vertical-align:top}
tr:nth-child(even){background:#f6f6f6}th{background:#e8e8e8}.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#17702a;font-weight:600}.FAIL{color:#b00020;font-weight:600}.warn{color:#a05a00;font-weight:600}
details{margin:2px 0}summary{cursor:pointer}code{font-size:13px}.note{color:#555}
svg text{font:10px sans-serif}
"""
SQNR_BAR_DB = 60.0  # the SQNR that fills a bar
LAYERS_SHOWN = 20   # the worst layers listed; the others are folded away
_SECTIONS = [("summary", "Summary"), ("passes", "Passes"), ("outputs", "Outputs"), ("layers", "Per-layer error"),
             ("activations", "Activation ranges"), ("weights", "Weight ranges per channel"),
             ("outliers", "Outlier channels"), ("float", "Kept in float"), ("lint", "Lint"),
             ("nonlinear", "Nonlinear replacements")]


def render(report: dict) -> str:
    """The page for `report` (as built by onnxq.analysis.report.build_report)."""
    body = {"summary": _summary, "passes": _passes, "outputs": _outputs, "layers": _layers,
            "activations": _activations, "weights": _weights, "outliers": _outliers, "float": _float,
            "lint": _lint, "nonlinear": _nonlinear}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>onnxq report: {_e(report['paths'].get('quantized', ''))}</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>onnxq quantization report</h1>",
             "<nav>" + " · ".join(f'<a href="#{key}">{title}</a>' for key, title in _SECTIONS) + "</nav>"]
    for key, title in _SECTIONS:
        parts.append(f'<section id="{key}"><h2>{title}</h2>{body[key](report)}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(value) -> str:
    return escape(str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return _e(value)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """`rows` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary(r: dict) -> str:
    rows = [("onnxq version", r["version"]), ("quantized by onnxq", r.get("model_version") or "-"),
            ("recipe", f"{r.get('recipe') or '-'} ({r.get('recipe_reason') or 'reason not recorded'})"),
            ("target", r["target"]), ("FP32 model", r["paths"].get("reference", "")),
            ("quantized model", r["paths"].get("quantized", "")), ("data", r["paths"].get("data", "")),
            ("samples", r["samples"]),
            ("padding", f"positions where '{r['padding_mask']}' is 0 left out" if r["padding_mask"] else "none"),
            ("quantized ops", f"{r['coverage_by_count']:.1%} of compute ops, {r['coverage_by_flops']:.1%} of FLOPs")]
    return _table(["", ""], [[_e(k), _e(v)] for k, v in rows])


def _passes(r: dict) -> str:
    if not r["passes"]:
        return '<p class="note">No passes recorded (not an onnxq model?).</p>'
    rows = []
    for i, p in enumerate(r["passes"], 1):
        change = p.get("max_rel_change")
        rows.append([str(i), _e(p.get("name")), _e(p.get("kind")), _num(p.get("seconds")),
                     "-" if change is None else _num(change, 3), _pass_summary(p.get("summary") or {})])
    return _table(["#", "pass", "kind", "seconds", "max rel. change", "summary"], rows)


def _pass_summary(summary: dict) -> str:
    """Scalar results on one line; each list or mapping (what a pass left alone and why) folded away."""
    flat = ", ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    nested = [(k, v) for k, v in summary.items() if isinstance(v, (dict, list))]
    folded = "".join(f"<details><summary>{_e(k)} ({len(v)})</summary><code>{_e(json.dumps(v, default=str, indent=1, ensure_ascii=False))}"
                     "</code></details>" for k, v in nested)
    return f"<code>{_e(flat)}</code>{folded}"


def _outputs(r: dict) -> str:
    rows = []
    for o in r["outputs"]:
        if o["kind"] == "integer":
            rows.append([_e(o["name"]), _e(o["verdict"]), "-", "-", "-", "-"])
        else:
            top1 = "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.2%}"
            rows.append([_e(o["name"]), "float", _num(o["cosine"], 6), _num(o["sqnr_db"]), _num(o["max_abs_error"]),
                         _e(top1)])
    return _table(["output", "kind", "cosine", "SQNR dB", "max |err|", "top-1 agree"], rows)


def _bar(value: float, top: float, width: int = 220, color: str = "#4a78c2") -> str:
    frac = 0.0 if not math.isfinite(value) or top <= 0 else max(0.0, min(1.0, value / top))
    return (f'<svg width="{width}" height="12" role="img"><rect width="{width}" height="12" fill="#eee"/>'
            f'<rect width="{frac * width:.1f}" height="12" fill="{color}"/></svg>')


def _layers(r: dict) -> str:
    layers = r["layers"]
    if not layers:
        return '<p class="note">No intermediate tensor is shared by name between the two models.</p>'
    finite = [x["sqnr_db"] for x in layers if math.isfinite(x["sqnr_db"])]
    top = min(max(finite + [1.0]), SQNR_BAR_DB)  # beyond it a layer is as good as exact: a full bar
    cosines = [x["cosine"] for x in layers if x.get("cosine") is not None and math.isfinite(x["cosine"])]
    floor = max(-1.0, min(0.99, min(cosines or [1.0]) - 0.1 * (1 - min(cosines or [1.0]))))
    rows = [[_e(x["tensor"]), f'<span class="num">{_num(x["sqnr_db"])}</span>', _bar(x["sqnr_db"], top),
             f'<span class="num">{_num(x.get("cosine"), 6)}</span>',
             _bar((x.get("cosine") or floor) - floor, 1 - floor, 120, "#6a9f58")] for x in layers]
    header = ["tensor", "SQNR dB", "", "cosine", ""]
    rest = "" if len(rows) <= LAYERS_SHOWN else (
        f"<details><summary>the other {len(rows) - LAYERS_SHOWN} layers</summary>"
        f"{_table(header, rows[LAYERS_SHOWN:])}</details>")
    return ('<p class="note">Tensors both graphs compute under the same name, worst SQNR first. SQNR = '
            f'10·log10(Σ ref² / Σ err²), bars up to {_num(top)} dB; cosine is the mean per sample, bars from '
            f'{_num(floor)} to 1.</p>' + _table(header, rows[:LAYERS_SHOWN]) + rest)


def _histogram(a: dict, width: int = 560, height: int = 120) -> str:
    counts = a["histogram"]
    if not counts:
        return '<p class="note">No histogram (empty or non-finite tensor).</p>'
    lo, hi = a["histogram_range"]
    peak = max(math.log1p(c) for c in counts) or 1.0
    bw = width / len(counts)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{height - math.log1p(c) / peak * height:.1f}" width="{bw - 0.5:.1f}" '
                   f'height="{math.log1p(c) / peak * height:.1f}" fill="#4a78c2"/>' for i, c in enumerate(counts) if c)

    def x_of(v):
        return (v - lo) / (hi - lo) * width if hi > lo else 0.0
    lines = "".join(f'<line x1="{x_of(v):.1f}" x2="{x_of(v):.1f}" y1="0" y2="{height}" stroke="#b00020" '
                    f'stroke-dasharray="4 2"/>' for v in a["clip"])
    labels = (f'<text x="0" y="{height + 12}">{_num(lo)}</text>'
              f'<text x="{width}" y="{height + 12}" text-anchor="end">{_num(hi)}</text>'
              f'<text x="{width / 2}" y="{height + 12}" text-anchor="middle">clip (dashed) '
              f'[{_num(a["clip"][0])}, {_num(a["clip"][1])}]; counts on a log scale; end bins hold values beyond</text>')
    return (f'<svg width="{width}" height="{height + 16}" role="img"><rect width="{width}" height="{height}" '
            f'fill="#fafafa"/>{bars}{lines}{labels}</svg>')


def _activations(r: dict) -> str:
    acts = r["activations"]
    if not acts:
        return '<p class="note">No activation is quantized.</p>'
    parts = [('<p class="note">Each tensor a QuantizeLinear reads: the clip its quantizer represents, '
              '[(qmin − zp)·scale, (qmax − zp)·scale], against the range observed on the data in the quantized '
              'model. Click a row for its histogram.</p>')]
    for i, a in enumerate(acts):
        observed = "-" if a["observed"] is None else f"[{_num(a['observed'][0])}, {_num(a['observed'][1])}]"
        flag = ' <span class="warn">clipped</span>' if a["clipped"] else ""
        opened = " open" if i == 0 else ""  # one histogram shown as an example
        parts.append(f'<details class="activation"{opened}><summary><code>{_e(a["tensor"])}</code>: clip '
                     f'[{_num(a["clip"][0])}, {_num(a["clip"][1])}] (scale {_num(a["scale"])} × {a["qmax"]}'
                     f'{", zero point " + _num(a["zero_point"]) if a["zero_point"] else ""}), observed {observed}'
                     f'{flag}</summary>{_histogram(a)}</details>')
    return "".join(parts)


def _line_chart(values: list[float], width: int = 360, height: int = 60, guide: float | None = None) -> str:
    top = max(values + [1e-30])
    step = width / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - v / top * height:.1f}" for i, v in enumerate(values))
    line = "" if guide is None or guide > top else (
        f'<line x1="0" x2="{width}" y1="{height - guide / top * height:.1f}" y2="{height - guide / top * height:.1f}" '
        f'stroke="#b00020" stroke-dasharray="4 2"/>')
    return (f'<svg width="{width}" height="{height}" role="img"><rect width="{width}" height="{height}" '
            f'fill="#fafafa"/><polyline points="{points}" fill="none" stroke="#4a78c2"/>{line}</svg>')


def _weights(r: dict) -> str:
    if not r["weights"]:
        return '<p class="note">No quantized weight.</p>'
    k = r["outlier_factor"]
    rows = []
    for w in r["weights"]:
        amax = w["channel_amax"]
        median = sorted(amax)[len(amax) // 2] if amax else 0.0
        rows.append([f'<code>{_e(w["tensor"])}</code><br>{_e(w["layer"])} ({_e(w["op"])})',
                     _e(f'{w["granularity"]}, {w["dtype"]}, {w["shape"]}'),
                     f'<span class="num">{len(amax)}</span>',
                     f'[{_num(min(w["channel_min"]))}, {_num(max(w["channel_max"]))}]',
                     _line_chart(amax, guide=k * median)])
    return (f'<p class="note">Max |w| of each output channel, dequantized from the model; dashed: {k:g}× the '
            'median channel (shown when within the chart).</p>'
            + _table(["weight / layer", "quantized as", "channels", "range", "max |w| per channel"], rows))


def _outliers(r: dict) -> str:
    found = r["outliers"]
    if not found:
        return f'<p class="note">No channel exceeds {r["outlier_factor"]:g}× its tensor\'s median max |value|.</p>'
    rows = []
    for f in found:
        shown = ", ".join(f'{o["channel"]} ({o["ratio"]:.1f}×)' for o in f["outliers"][:12])
        more = f' and {len(f["outliers"]) - 12} more' if len(f["outliers"]) > 12 else ""
        rows.append([_e(f["kind"]), f'<code>{_e(f["tensor"])}</code>', f'<span class="num">{f["channels"]}</span>',
                     _num(f["median"]), _e(shown + more)])
    return (f'<p class="note">Channels whose max |value| exceeds {r["outlier_factor"]:g}× the median channel of '
            'their tensor (channel: ratio to the median).</p>'
            + _table(["kind", "tensor", "channels", "median max |x|", "outlier channels"], rows))


def _float(r: dict) -> str:
    reasons = r["float_reasons"]
    if not reasons:
        return '<p class="note">No node records a reason for staying in float.</p>'
    rows = [[f'<span class="num">{len(nodes)}</span>', _e(reason),
             (f"<details><summary>{_e(', '.join(nodes[:3]) + (' …' if len(nodes) > 3 else ''))}</summary>"
              f"{_e(', '.join(nodes))}</details>")]
            for reason, nodes in sorted(reasons.items(), key=lambda kv: -len(kv[1]))]
    return _table(["count", "kept in float because", "nodes"], rows)


def _lint(r: dict) -> str:
    rows = [[_e(x["rule"]), f'<span class="{_e(x["status"])}">{_e(x["status"])}</span>', _e(x["severity"]),
             f'<span class="num">{len(x["violations"])}</span>', _e(x["title"]),
             _e("; ".join(x["violations"][:3]) + (" …" if len(x["violations"]) > 3 else ""))] for x in r["lint"]]
    return (f'<p class="note">{_e(r["target"])} profile.</p>'
            + _table(["rule", "status", "severity", "count", "what it checks", "violations"], rows))


def _nonlinear(r: dict) -> str:
    fidelity = r["fidelity"]
    if not fidelity:
        return (f'<p class="note">No nonlinear op was replaced by a lookup table or integer subgraph '
                f'({r["nonlinear_ops"]} nonlinear/normalisation ops; no fidelity recorded).</p>')
    top = max([f.get("max_steps") or 0.0 for f in fidelity] + [1.0])
    rows = [[_e(f.get("node", "")), _e(f.get("function", "")), _e(f.get("method", "")),
             _e("/".join(f.get("replaced_ops", []))),
             "-" if not f.get("range") else f'[{_num(f["range"][0])}, {_num(f["range"][1])}]',
             f'<span class="num">{_num(f.get("max_steps"))}</span>', _bar(f.get("max_steps") or 0.0, top, 140, "#c2704a"),
             f'<span class="num">{_num(f.get("mean_steps"))}</span>', "yes" if f.get("input_quantized") else "no"]
            for f in fidelity]
    return ('<p class="note">Error of each replacement over its calibrated input range, in INT8 output steps, as '
            'measured when the pass ran (the model records these figures, not the error curve).</p>'
            + _table(["node", "function", "replaced by", "ops", "input range", "max err", "", "mean err",
                      "int input"], rows))
