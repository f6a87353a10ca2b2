"""The recipe onnxq picks by itself, and the reason it records: the transformer recipe only where
recognised transformer blocks carry most of the weighted-layer compute."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import attention_model, mobilenet_block_model, random_images
from onnxq import quantize
from onnxq.ir.modelio import load_model
from onnxq.pipeline.choice import choose_recipe


def attention_then_heavy_head(width: int = 2048) -> onnx.ModelProto:
    """attention_model's block followed by two wide linear layers (no activation between: not an
    MLP), which carry far more FLOPs than the attention block: an attention neck in a bigger net."""
    model = attention_model()
    graph = model.graph
    out = graph.output[0]
    hidden = out.type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(0)
    graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(hidden, width)).astype(np.float32) * 0.1, "head.w1"),
                              numpy_helper.from_array(rng.normal(size=(width, hidden)).astype(np.float32) * 0.1, "head.w2")])
    graph.node.extend([helper.make_node("MatMul", [out.name, "head.w1"], ["head.h"], name="head/MatMul"),
                       helper.make_node("MatMul", ["head.h", "head.w2"], ["head.out"], name="head/MatMul_1")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("head.out", TensorProto.FLOAT, ["N", 8, hidden]))
    onnx.checker.check_model(model)
    return model


def feeds(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"hidden": rng.normal(size=(n, 8, 16)).astype(np.float32), "attention_mask": np.ones((n, 8), np.int64)}


def test_a_cnn_gets_the_default_recipe_and_says_why():
    choice = choose_recipe(load_model(mobilenet_block_model()), {"input": random_images(1)})
    assert choice.recipe == "default" and "no Softmax" in choice.reason


def test_a_transformer_block_gets_the_transformer_recipe():
    choice = choose_recipe(load_model(attention_model()), feeds(1))
    assert choice.recipe == "transformer-w8a8" and "100% of the weighted-layer FLOPs" in choice.reason


def test_one_attention_block_in_a_heavier_net_keeps_the_default_recipe():
    choice = choose_recipe(load_model(attention_then_heavy_head()), feeds(1))
    assert choice.recipe == "default", choice
    assert "1 attention block(s)" in choice.reason and "quantized as a CNN" in choice.reason


def test_the_choice_and_its_reason_are_logged_and_recorded():
    lines = []
    q = quantize(attention_model(), feeds(), show_progress=False, log=lines.append)
    props = {p.key: p.value for p in q.metadata_props}
    assert props["onnxq.recipe"] == "transformer-w8a8"
    assert props["onnxq.recipe_reason"].startswith("transformer: 1 attention block(s)")
    assert any(line.startswith("recipe: transformer-w8a8 (transformer:") for line in lines)
    q = quantize(attention_model(), feeds(), recipe="default", show_progress=False, log=lines.append)
    assert {p.key: p.value for p in q.metadata_props}["onnxq.recipe_reason"] == "named by the user"
