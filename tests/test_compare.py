"""compare: exact numbers on identical and quantized models."""

import math

import onnx_ir as ir

from builders import mobilenet_block_model, random_images
from onnxq import quantize
from onnxq.analysis.compare import compare_models

DATA = {"input": random_images(8, seed=3)}


def test_identical_models_agree_perfectly():
    model = ir.from_proto(mobilenet_block_model())
    result = compare_models(model, ir.from_proto(mobilenet_block_model()), DATA, show_progress=False)
    out = result["outputs"][0]
    assert out["name"] == "logits" and math.isinf(out["sqnr_db"]) and abs(out["cosine"] - 1) < 1e-12
    assert out["max_abs_error"] == 0 and out["top1_agreement"] == 1.0
    assert result["samples"] == 8 and result["layers"] and all(math.isinf(r["sqnr_db"]) for r in result["layers"])


def test_quantized_model_per_output_and_per_layer():
    qmodel = quantize(mobilenet_block_model(), {"input": random_images(32, seed=1)}, show_progress=False)
    result = compare_models(ir.from_proto(mobilenet_block_model()), ir.from_proto(qmodel), DATA, show_progress=False)
    out = result["outputs"][0]
    assert 20 < out["sqnr_db"] < 80 and 0.99 < out["cosine"] < 1 and out["max_abs_error"] > 0
    layers = result["layers"]
    assert layers == sorted(layers, key=lambda r: r["sqnr_db"])  # worst first
    names = {r["tensor"] for r in layers}
    assert "block.out" in names
    assert not any(n.startswith("expand.") for n in names)  # rescaled by equalize (into the depthwise conv)
    assert "depthwise.act" in names  # left alone: per-channel weights gain nothing from rescaling a dense conv
