"""Embedding tables (Gather on a constant float table): INT8 per row with `embeddings: int8`, float otherwise."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean
from onnxq import quantize
from onnxq.analysis.inspection import inspect_model
from onnxq.ir.modelio import load_model
from onnxq.pipeline.recipes import load_recipe
from onnxq.quant.lint import lint

VOCAB, WIDTH, SEQ = 500, 32, 6


def embedding_model(*, tied: bool = False) -> onnx.ModelProto:
    """ids → Gather(table) → (emb, emb·W); rows of very different magnitudes, so per-row scales matter.
    `tied`: the table is also the weight of a MatMul (as a tied output head), so it must stay float."""
    rng = np.random.default_rng(0)
    table = (rng.normal(size=(VOCAB, WIDTH)) * rng.uniform(0.01, 3.0, size=(VOCAB, 1))).astype(np.float32)
    weight = (rng.normal(size=(WIDTH, 8)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "W"], ["proj"], name="project")]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", SEQ, WIDTH]),
               helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["B", SEQ, 8])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "W")]
    if tied:
        nodes.append(helper.make_node("MatMul", ["emb", "tableT"], ["logits"], name="head"))
        nodes.append(helper.make_node("Transpose", ["table"], ["tableT"], name="tie"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", SEQ, VOCAB]))
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", SEQ])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ids(n, seed):
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ)).astype(np.int64)}


def _quantize(model, embeddings):
    return quantize(model, _ids(16, 1), recipe=[{"upgrade_opset": {"opset": 19}},
                                                {"quantize": {"embeddings": embeddings, "bias_correction": False}}],
                    batch_size=4, show_progress=False, log=lambda *_: None)


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_int8_table_within_the_per_row_bound_and_smaller():
    model = embedding_model()
    quantized = _quantize(model, "int8")
    assert "table" not in {t.name for t in quantized.graph.initializer}  # the float table is gone
    assert len(quantized.SerializeToString()) < 0.4 * len(model.SerializeToString())
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and "table" in n.input[0])
    assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 0
    feed = _ids(8, seed=3)
    float_out, q_out = _run(model, feed), _run(quantized, feed)
    table = numpy_helper.to_array(model.graph.initializer[0])
    half_step = np.abs(table).max(axis=1) / 127 / 2  # max-abs scale per row, symmetric INT8 weights
    bound = half_step[feed["ids"]][..., None] * (1 + 1e-6)
    assert np.all(np.abs(q_out["emb"] - float_out["emb"]) <= bound)
    assert not np.array_equal(q_out["emb"], float_out["emb"])  # it was rounded


def test_lint_and_inspect_report_the_table():
    quantized = load_model(_quantize(embedding_model(), "int8"))
    assert_lint_clean(quantized)
    assert next(r for r in lint(quantized) if r.rule == "R17").status == "pass"
    info = inspect_model(quantized)
    assert info.quantized_op_counts.get("Gather") == 1
    assert not any(reason.startswith("Gather") for reason in info.float_reasons)
    assert info.qdq["DequantizeLinear (weight)"] == 2  # the table and W


def test_float_table_is_counted_and_listed_as_float():
    quantized = _quantize(embedding_model(), "float")
    assert "table" in {t.name for t in quantized.graph.initializer}
    info = inspect_model(load_model(quantized))
    assert "Gather" not in info.quantized_op_counts
    assert info.float_reasons["Gather: embedding table kept in float (quantize option embeddings: float)"] == ["embed"]


def test_tied_table_stays_float():
    """A table another op also reads (a tied output head) is not an embedding table only: left float."""
    quantized = _quantize(embedding_model(tied=True), "int8")
    assert "table" in {t.name for t in quantized.graph.initializer}
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in ("emb",) for n in quantized.graph.node)


def test_lint_flags_a_table_scaled_off_the_gathered_axis():
    quantized = _quantize(embedding_model(), "int8")
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and "table" in n.input[0])
    q_table = next(t for t in quantized.graph.initializer if t.name == dq.input[0])
    for name, size in ((dq.input[1], WIDTH), (dq.input[2], WIDTH)):  # per column instead of per row
        t = next(t for t in quantized.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(-1)[:1].repeat(size), name))
    dq.attribute[0].i = 1
    assert q_table.dims == [VOCAB, WIDTH]
    result = next(r for r in lint(load_model(quantized)) if r.rule == "R17")
    assert result.status == "FAIL" and "off the gathered axis" in result.violations[0]


@pytest.mark.parametrize("recipe", ["transformer-w8a8", "transformer-w4a8", "full-int8"])
def test_transformer_recipes_take_the_embeddings_option(recipe):
    # float by default until measured on the LM benchmarks; an including recipe turns it on
    _, passes = load_recipe(recipe)
    assert next(p for p in passes if p.name == "quantize").embeddings == "float"
    _, passes = load_recipe([{"include": recipe, "override": {"quantize": {"embeddings": "int8"}}}])
    assert next(p for p in passes if p.name == "quantize").embeddings == "int8"


def test_ort_cpu_target_quantizes_the_table_and_the_gather_output():
    model = embedding_model()
    quantized = quantize(model, _ids(16, 1), target="ort-cpu", batch_size=4, show_progress=False, log=lambda *_: None,
                         recipe=[{"upgrade_opset": {"opset": 19}}, {"quantize": {"embeddings": "int8"}}])
    producers = {o: n for n in quantized.graph.node for o in n.output}
    gather = next(n for n in quantized.graph.node if n.op_type == "Gather")
    assert producers[gather.input[0]].op_type == "DequantizeLinear"
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == gather.output[0] for n in quantized.graph.node)
    # the MatMul writing the model output "proj" has its output quantized too, or ORT would not fuse it
    matmul = next(n for n in quantized.graph.node if n.op_type == "MatMul")
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == matmul.output[0] for n in quantized.graph.node)
    feed = _ids(4, seed=3)
    ref, out = _run(model, feed)["proj"], _run(quantized, feed)["proj"]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def cls_pooling_model() -> onnx.ModelProto:
    """x → MatMul → Gather(token 0 along the sequence) → MatMul: a Gather of an activation, not of a table."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.normal(size=(WIDTH, WIDTH)) / 6).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.normal(size=(WIDTH, 4)) / 6).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(0, np.int64), "first")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="encode"),
             helper.make_node("Gather", ["h", "first"], ["cls"], name="cls_token", axis=1),
             helper.make_node("MatMul", ["cls", "W2"], ["logits"], name="classify")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", SEQ, WIDTH])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_a_quantized_activation_read_by_a_gather_is_not_a_table(target):
    calib = {"x": np.random.default_rng(2).normal(size=(16, SEQ, WIDTH)).astype(np.float32)}
    quantized = quantize(cls_pooling_model(), calib, target=target, batch_size=4, show_progress=False,
                         log=lambda *_: None)
    result = next(r for r in lint(load_model(quantized), target=target) if r.rule == "R17")
    assert result.status == "pass", result.violations
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    if target == "ort-cpu":  # the case that was flagged: ORT's placement puts a Q/DQ pair before the Gather
        gather = next(n for n in quantized.graph.node if n.op_type == "Gather")
        assert producers[gather.input[0]] == "DequantizeLinear"
