"""report: the HTML page's sections and numbers agree with compare, inspect, lint and the model itself;
model-supplied strings are escaped; the page renders in a headless browser when one is installed."""

import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import attention_model, mobilenet_block_model, random_images
from onnxq import quantize, report
from onnxq.analysis.compare import compare_models
from onnxq.analysis.report_html import _num
from onnxq.cli.main import main
from onnxq.ir.graph import const_array

SECTIONS = {"summary", "passes", "outputs", "layers", "activations", "weights", "outliers", "float", "lint",
            "nonlinear"}
CALIB = {"input": random_images(16, seed=1)}
EVAL = {"input": random_images(8, seed=3)}


class Page(HTMLParser):
    """The section ids, each section's text, and every tag name seen."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.tags: list[str] = []
        self._section = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "section":
            self._section = dict(attrs)["id"]
            self.sections[self._section] = []

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section].append(data.strip())

    def text(self, section: str) -> list[str]:
        return [t for t in self.sections[section] if t]


def _quantized_cnn():
    return quantize(mobilenet_block_model(), CALIB, show_progress=False, log=lambda *_: None)


def test_cnn_report_sections_and_numbers_agree_with_compare(tmp_path):
    qmodel = _quantized_cnn()
    out = tmp_path / "report.html"
    result = report(mobilenet_block_model(), qmodel, EVAL, out, show_progress=False)
    page = Page(out.read_text(encoding="utf-8"))
    assert set(page.sections) == SECTIONS and "script" not in page.tags

    expected = compare_models(ir.from_proto(mobilenet_block_model()), ir.from_proto(qmodel), EVAL, show_progress=False)
    assert [r["tensor"] for r in result["layers"]] == [r["tensor"] for r in expected["layers"]]
    for got, want in zip(result["layers"], expected["layers"]):
        assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], rel=1e-9) and 0.99 < got["cosine"] <= 1 + 1e-9
    layer_text = page.text("layers")
    shown = [t for t in layer_text if t in {r["tensor"] for r in expected["layers"]}]
    assert shown == [r["tensor"] for r in expected["layers"]]  # worst first, as compare
    assert _num(expected["layers"][0]["sqnr_db"]) in layer_text
    output = expected["outputs"][0]
    assert _num(output["sqnr_db"]) in page.text("outputs") and _num(output["cosine"], 6) in page.text("outputs")

    summary = " ".join(page.text("summary"))
    assert "default" in summary and "tensorrt" in summary and "0.1.0" in summary
    assert [p for p in page.text("passes") if p in ("fold_batchnorm", "equalize", "quantize")] == \
        ["fold_batchnorm", "equalize", "quantize"]
    assert any("weights_quantized=5" in t for t in page.text("passes"))
    assert any("fused into the preceding weighted layer" in t for t in page.text("float"))
    assert {"R1", "R8"} <= set(page.text("lint")) and "pass" in page.text("lint")
    assert any("No nonlinear op was replaced" in t for t in page.text("nonlinear"))


def test_cnn_clips_and_weight_channels_agree_with_the_model(tmp_path):
    qmodel = _quantized_cnn()
    result = report(mobilenet_block_model(), qmodel, EVAL, tmp_path / "r.html", show_progress=False)
    model = ir.from_proto(qmodel)
    scales = {n.inputs[0].name: float(const_array(n.inputs[1])) for n in model.graph
              if n.op_type == "QuantizeLinear" and const_array(n.inputs[0]) is None}
    assert {a["tensor"] for a in result["activations"]} == set(scales)
    for a in result["activations"]:
        assert a["clip"][1] == pytest.approx(scales[a["tensor"]] * 127) and a["clip"][0] == pytest.approx(-128 * scales[a["tensor"]])
        assert sum(a["histogram"]) > 0 and a["observed"][0] <= a["observed"][1]
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert all(_num(a["clip"][1]) in text for a in result["activations"])

    dq = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear" and const_array(n.inputs[0]) is not None}
    assert {w["tensor"] for w in result["weights"]} == set(dq)
    for w in result["weights"]:
        node = dq[w["tensor"]]
        q, scale = const_array(node.inputs[0]).astype(np.float64), const_array(node.inputs[1]).astype(np.float64)
        axis = 0 if w["op"] == "Conv" else 0 if node.outputs[0].consumers()[0].op_type == "Gemm" else q.ndim - 1
        amax = np.abs(np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)).max(axis=1) * scale
        np.testing.assert_allclose(w["channel_amax"], amax, rtol=1e-12)

    for found in result["outliers"]:
        row = next(r for r in result["activations"] + result["weights"] if r["tensor"] == found["tensor"])
        median = float(np.median(row["channel_amax"]))
        assert found["outliers"] and all(o["amax"] > result["outlier_factor"] * median for o in found["outliers"])
    # the builder's expand conv has channels tens of times larger than the rest: listed
    assert any(f["tensor"].startswith("expand.weight") for f in result["outliers"])


def _attention_data():
    rng = np.random.default_rng(0)
    mask = np.ones((16, 8), np.int64)
    mask[::2, -2:] = 0
    return {"hidden": rng.normal(size=(16, 8, 16)).astype(np.float32), "attention_mask": mask}


def test_transformer_report_lists_replacements_with_their_fidelity(tmp_path):
    data = _attention_data()
    qmodel = quantize(attention_model(), data, recipe="full-int8", show_progress=False, log=lambda *_: None)
    out = tmp_path / "t.html"
    result = report(attention_model(), qmodel, data, out, show_progress=False)
    page = Page(out.read_text(encoding="utf-8"))
    assert set(page.sections) == SECTIONS
    assert result["padding_mask"] == "attention_mask" and "attention_mask" in " ".join(page.text("summary"))
    functions = {f["function"] for f in result["fidelity"]}
    assert {"softmax", "layernorm"} <= functions
    nonlinear = page.text("nonlinear")
    for f in result["fidelity"]:
        assert f["node"] in nonlinear and _num(f["max_steps"]) in nonlinear
    expected = compare_models(ir.from_proto(attention_model()), ir.from_proto(qmodel), data, show_progress=False)
    assert [r["sqnr_db"] for r in result["layers"]] == pytest.approx([r["sqnr_db"] for r in expected["layers"]])
    assert math.isclose(result["outputs"][0]["sqnr_db"], expected["outputs"][0]["sqnr_db"])


def test_model_supplied_names_are_escaped(tmp_path):
    proto = mobilenet_block_model()
    evil = '<script>alert("x")</script>'
    for node in proto.graph.node:
        if node.name == "stem/Clip":
            node.name = evil
        if node.name == "pool":  # an intermediate tensor name too
            node.output[0] = '"><img src=x onerror=alert(1)>'
    for node in proto.graph.node:
        node.input[:] = ['"><img src=x onerror=alert(1)>' if i == "pooled" else i for i in node.input]
    qmodel = quantize(proto, CALIB, show_progress=False, log=lambda *_: None)
    out = tmp_path / "evil.html"
    report(proto, qmodel, EVAL, out, show_progress=False)
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert "script" not in page.tags and "img" not in page.tags
    assert evil not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert any(evil in t for t in page.text("float"))  # shown as text


def test_cli_report_and_quantize_report_html(tmp_path):
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(mobilenet_block_model(), model)
    np.savez(calib, **CALIB)
    q, page, json_report = tmp_path / "q.onnx", tmp_path / "q.html", tmp_path / "q.json"
    assert main(["quantize", str(model), "--calib", str(calib), "-o", str(q), "--report", str(json_report),
                 "--report-html", str(page), "-q"]) == 0
    assert json_report.read_text().startswith("{") and set(Page(page.read_text(encoding="utf-8")).sections) == SECTIONS
    out = tmp_path / "r.html"
    assert main(["report", str(model), str(q), "--data", str(calib), "-o", str(out), "--max-samples", "4",
                 "--batch-size", "2", "-q"]) == 0
    summary = Page(out.read_text(encoding="utf-8")).text("summary")
    assert summary[summary.index("samples") + 1] == "4"  # --max-samples 4 reached the page
    assert main(["report", str(model), str(q), "--data", str(calib), "-o", str(model), "-q"]) == 1  # never overwrite an input


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary (apt-get install chromium) to render the page")
def test_page_renders_in_headless_chromium_without_console_errors(tmp_path):
    out = tmp_path / "report.html"
    report(mobilenet_block_model(), _quantized_cnn(), EVAL, out, show_progress=False)
    run = subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", out.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    page = Page(run.stdout)
    assert set(page.sections) == SECTIONS and page.text("layers")
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr


def test_feeds_read_once_serve_both_passes(tmp_path):
    qmodel = _quantized_cnn()
    from_dict = report(mobilenet_block_model(), qmodel, EVAL, tmp_path / "a.html", show_progress=False)
    feeds = ({"input": EVAL["input"][i:i + 1]} for i in range(len(EVAL["input"])))  # a generator: one pass only
    from_feeds = report(mobilenet_block_model(), qmodel, feeds, tmp_path / "b.html", show_progress=False)
    assert from_feeds["samples"] == 8 and from_feeds["layers"] == from_dict["layers"]
    assert [a["histogram"] for a in from_feeds["activations"]] == [a["histogram"] for a in from_dict["activations"]]
