"""fold_position_bias is exact, and moves only position-dependent constants out of the quantized input."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION
from conftest import rel_change, run
from onnxq.api import quantize
from onnxq.ir.graph import const_array
from onnxq.pipeline import PassContext, load_recipe, run_pipeline

TOKENS, WIDTH = 12, 16


def decoder_block(position_scale: float = 3.0) -> onnx.ModelProto:
    """DETR-style attention inputs: q = (tgt + query_pos)·W_q + b_q, k = (tgt + query_pos)·W_k (no bias),
    v = tgt·W_v, and a residual that reads tgt + query_pos; plus a per-channel constant addend (a bias
    vector, not a position term) before another linear layer."""
    rng = np.random.default_rng(0)
    inits = {"query_pos": rng.normal(size=(1, TOKENS, WIDTH)) * position_scale,
             "w_q": rng.normal(size=(WIDTH, WIDTH)) / 4, "b_q": rng.normal(size=WIDTH),
             "w_k": rng.normal(size=(WIDTH, WIDTH)) / 4, "w_v": rng.normal(size=(WIDTH, WIDTH)) / 4,
             "channel_shift": rng.normal(size=WIDTH), "w_o": rng.normal(size=(WIDTH, WIDTH)) / 4}
    nodes = [helper.make_node("Add", ["tgt", "query_pos"], ["with_pos"], name="pos/Add"),
             helper.make_node("MatMul", ["with_pos", "w_q"], ["q_raw"], name="q_proj/MatMul"),
             helper.make_node("Add", ["b_q", "q_raw"], ["q"], name="q_proj/Add"),
             helper.make_node("MatMul", ["with_pos", "w_k"], ["k"], name="k_proj/MatMul"),
             helper.make_node("MatMul", ["tgt", "w_v"], ["v"], name="v_proj/MatMul"),
             helper.make_node("Add", ["with_pos", "v"], ["residual"], name="residual/Add"),
             helper.make_node("Add", ["residual", "channel_shift"], ["shifted"], name="shift/Add"),
             helper.make_node("MatMul", ["shifted", "w_o"], ["o"], name="o_proj/MatMul")]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", TOKENS, WIDTH])
    graph = helper.make_graph(nodes, "decoder_block", [value("tgt")], [value("q"), value("k"), value("o")],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def folded(model: onnx.ModelProto) -> tuple[ir.Model, dict]:
    work = ir.from_proto(model)
    _, passes = load_recipe(["fold_position_bias"])
    records = run_pipeline(work, passes, PassContext(show_progress=False), verify_exact=False)
    return work, records[0].summary


def test_fold_position_bias_is_exact_and_linear_layers_read_tgt_directly():
    model = decoder_block()
    work, summary = folded(model)
    tgt = np.random.default_rng(1).normal(size=(3, TOKENS, WIDTH)).astype(np.float32)
    before, after = run(model, {"tgt": tgt}), run(ir.to_proto(work), {"tgt": tgt})
    assert max(rel_change(b, a) for b, a in zip(before, after)) < 1e-5
    assert summary == {"position_adds": 1, "linears_folded": 2}
    nodes = {n.name: n for n in work.graph}
    assert nodes["q_proj/MatMul"].inputs[0].name == "tgt" and nodes["k_proj/MatMul"].inputs[0].name == "tgt"
    assert const_array(nodes["q_proj/Add"].inputs[0]).shape == (1, TOKENS, WIDTH)  # per-token bias P·W_q + b_q
    assert nodes["residual/Add"].inputs[0].name == "with_pos"  # the residual still reads tgt + query_pos
    assert nodes["o_proj/MatMul"].inputs[0].name == "shifted"  # a per-channel vector is not a position term


def test_fold_position_bias_lowers_the_per_tensor_int8_error_of_the_query():
    """A large query_pos sets the INT8 step at q_proj's input; folded, only tgt is quantized there."""
    model = decoder_block(position_scale=10.0)
    rng = np.random.default_rng(2)
    calib = {"tgt": rng.normal(size=(8, TOKENS, WIDTH)).astype(np.float32)}
    tgt = rng.normal(size=(4, TOKENS, WIDTH)).astype(np.float32)
    steps = [{"quantize": {"calibrator": "max"}}]
    plain = quantize(model, calib, recipe=steps, show_progress=False, log=lambda *_: None)
    with_fold = quantize(model, calib, recipe=["fold_position_bias", *steps], show_progress=False, log=lambda *_: None)
    reference = run(model, {"tgt": tgt})[0]
    error = {name: rel_change(reference, run(m, {"tgt": tgt})[0]) for name, m in (("plain", plain), ("fold", with_fold))}
    assert error["fold"] < error["plain"] / 2, error
