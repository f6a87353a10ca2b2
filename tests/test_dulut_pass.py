"""The dulut pass on small graphs: every function form found, replaced, within one INT8 output step,
bit-exact to onnxq.passes.nonlinear.lut's NumPy evaluation in ONNX Runtime, and lint clean for TensorRT."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, run
from onnxq.analysis.inspection import inspect_model
from onnxq.api import quantize
from onnxq.ir.modelio import load_model
from onnxq.passes.nonlinear.lut import FUNCTIONS, DualLUT, get_function

ANCHORS = {"Gelu", "Erf", "Tanh", "Sigmoid", "Softplus", "HardSwish", "Exp", "Pow"}


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def functions_model(opset: int = 17) -> onnx.ModelProto:
    """One branch per function form, each reading x: GELU (Erf, half first), GELU (tanh form with Pow),
    SiLU (Sigmoid·x, operands swapped), Sigmoid read twice (so it is not SiLU), Tanh, Softplus,
    HardSwish, Exp of a shifted input."""
    n, inits = [], [_c("root2", math.sqrt(2)), _c("one", 1.0), _c("half", 0.5), _c("three", 3.0),
                    _c("k0", 0.044715), _c("k1", math.sqrt(2 / math.pi)), _c("shift", 12.0), _c("two", 2.0)]
    n += [helper.make_node("Mul", ["x", "half"], ["g_half"], name="gelu/half"),
          helper.make_node("Div", ["x", "root2"], ["g_div"], name="gelu/div"),
          helper.make_node("Erf", ["g_div"], ["g_erf"], name="gelu/erf"),
          helper.make_node("Add", ["g_erf", "one"], ["g_add"], name="gelu/add"),
          helper.make_node("Mul", ["g_half", "g_add"], ["out_gelu"], name="gelu/mul")]
    n += [helper.make_node("Pow", ["x", "three"], ["t_cube"], name="gelut/pow"),
          helper.make_node("Mul", ["t_cube", "k0"], ["t_k0"], name="gelut/mul0"),
          helper.make_node("Add", ["x", "t_k0"], ["t_inner"], name="gelut/add0"),
          helper.make_node("Mul", ["t_inner", "k1"], ["t_arg"], name="gelut/mul1"),
          helper.make_node("Tanh", ["t_arg"], ["t_tanh"], name="gelut/tanh"),
          helper.make_node("Add", ["t_tanh", "one"], ["t_add"], name="gelut/add1"),
          helper.make_node("Mul", ["x", "t_add"], ["t_mul"], name="gelut/mul2"),
          helper.make_node("Mul", ["t_mul", "half"], ["out_gelu_tanh"], name="gelut/mul3")]
    n += [helper.make_node("Sigmoid", ["x"], ["s_sig"], name="silu/sigmoid"),
          helper.make_node("Mul", ["s_sig", "x"], ["out_silu"], name="silu/mul")]
    n += [helper.make_node("Sigmoid", ["x"], ["out_sigmoid"], name="sigmoid"),
          helper.make_node("Mul", ["out_sigmoid", "two"], ["out_sigmoid2"], name="sigmoid/reader")]
    n += [helper.make_node("Tanh", ["x"], ["out_tanh"], name="tanh"),
          helper.make_node("Softplus", ["x"], ["out_softplus"], name="softplus"),
          helper.make_node("HardSwish", ["x"], ["out_hardswish"], name="hardswish"),
          helper.make_node("Sub", ["x", "shift"], ["e_in"], name="exp/sub"),
          helper.make_node("Exp", ["e_in"], ["out_exp"], name="exp")]
    outs = ["out_gelu", "out_gelu_tanh", "out_silu", "out_sigmoid", "out_sigmoid2", "out_tanh", "out_softplus",
            "out_hardswish", "out_exp"]
    graph = helper.make_graph(n, "functions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 16]) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


EXPECTED = {"gelu/erf": "gelu", "gelut/tanh": "gelu_tanh", "silu/sigmoid": "silu", "sigmoid": "sigmoid",
            "tanh": "tanh", "softplus": "softplus", "hardswish": "hardswish", "exp": "exp"}
INPUTS = {"gelu/erf": "x", "gelut/tanh": "x", "silu/sigmoid": "x", "sigmoid": "x", "tanh": "x", "softplus": "x",
          "hardswish": "x", "exp": "e_in"}


def calib(n=64, seed=0):
    return {"x": (np.random.default_rng(seed).normal(size=(n, 16)) * 3).astype(np.float32)}


def _dulut(model, steps=("dulut",)):
    return quantize(model, calib(), recipe=list(steps), batch_size=16, show_progress=False, log=lambda *_: None)


def _fidelity(proto):
    return {e["node"]: e for e in json.loads(load_model(proto).metadata_props["onnxq.fidelity"])}


def _lut_from_graph(proto, base, function) -> DualLUT:
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fn = get_function(function)
    return DualLUT(float(inits[f"{base}_lo"]), float(inits[f"{base}_hi"]), inits[f"{base}_lut1"],
                   inits[f"{base}_lut2"], fn.tail_slopes())


def test_every_form_is_found_and_replaced():
    out = _dulut(functions_model())
    ops = {n.op_type for n in out.graph.node}
    assert not ops & ANCHORS, ops & ANCHORS
    fid = _fidelity(out)
    assert {k: v["function"] for k, v in fid.items()} == EXPECTED
    assert fid["gelu/erf"]["replaced_ops"] == ["Div", "Erf", "Add", "Mul", "Mul"] or \
        sorted(fid["gelu/erf"]["replaced_ops"]) == sorted(["Mul", "Div", "Erf", "Add", "Mul"])
    assert sorted(fid["silu/sigmoid"]["replaced_ops"]) == ["Mul", "Sigmoid"]
    assert fid["sigmoid"]["replaced_ops"] == ["Sigmoid"]  # read by another node too: not part of a SiLU


def test_within_one_output_step_and_bit_exact_to_numpy():
    model = functions_model()
    out = _dulut(model)
    x = (np.random.default_rng(5).normal(size=(256, 16)) * 4).astype(np.float32)
    x[0, :4] = [-1e4, 1e4, -40.0, 40.0]  # far outside the calibrated range: the tails
    names = [o.name for o in model.graph.output]
    before = dict(zip(names, run(model, {"x": x})))
    after = dict(zip(names, run(out, {"x": x})))
    fid = _fidelity(out)
    readers = {"gelu/erf": "out_gelu", "gelut/tanh": "out_gelu_tanh", "silu/sigmoid": "out_silu",
               "sigmoid": "out_sigmoid", "tanh": "out_tanh", "softplus": "out_softplus", "hardswish": "out_hardswish",
               "exp": "out_exp"}
    for node, entry in fid.items():
        assert entry["max_steps"] < 1.0 and entry["method"] == "dulut 32+32", entry
        lut = _lut_from_graph(out, node, entry["function"])
        inp = x - np.float32(12.0) if INPUTS[node] == "e_in" else x
        # ONNX Runtime computes exactly what onnxq.passes.nonlinear.lut's float32 evaluation computes
        np.testing.assert_array_equal(after[readers[node]], lut(inp))
        # and within one INT8 output step of the function on the calibrated range
        lo, hi = entry["range"]
        inside = (inp >= lo) & (inp <= hi)
        err = np.abs(after[readers[node]][inside].astype(np.float64) - FUNCTIONS[entry["function"]](inp[inside].astype(np.float64)))
        assert err.max() / entry["output_step"] < 1.0
    np.testing.assert_allclose(after["out_sigmoid2"], 2 * after["out_sigmoid"])
    assert np.abs(after["out_gelu"] - before["out_gelu"]).max() < 0.05


def test_gelu_op_and_swish_forms():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    nodes = [helper.make_node("Gelu", ["x"], ["a"], name="gelu_op"),
             helper.make_node("Gelu", ["x"], ["b"], name="gelu_tanh_op", approximate="tanh"),
             helper.make_node("Mul", ["x", "k"], ["kx"], name="quick/mul"),
             helper.make_node("Sigmoid", ["kx"], ["sk"], name="quick/sigmoid"),
             helper.make_node("Mul", ["x", "sk"], ["c"], name="quick/out")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 8]) for o in "abc"],
                              [_c("k", 1.702)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    out = quantize(model, {"x": (np.random.default_rng(0).normal(size=(32, 8)) * 3).astype(np.float32)},
                   recipe=["dulut"], batch_size=8, show_progress=False, log=lambda *_: None)
    fid = _fidelity(out)
    assert {k: v["function"] for k, v in fid.items()} == {"gelu_op": "gelu", "gelu_tanh_op": "gelu_tanh",
                                                          "quick/sigmoid": "quick_gelu"}
    assert not {n.op_type for n in out.graph.node} & {"Gelu", "Sigmoid"}


def mlp_model(hidden=16, inner=32, act="gelu", seed=0) -> onnx.ModelProto:
    """x → MatMul → +b → GELU (Erf form) or SiLU → MatMul → out: an FFN block."""
    rng = np.random.default_rng(seed)
    inits = [_c("w1", rng.normal(size=(hidden, inner)) / np.sqrt(hidden)), _c("b1", rng.normal(size=inner) * 0.1),
             _c("w2", rng.normal(size=(inner, hidden)) / np.sqrt(inner)), _c("root2", math.sqrt(2)), _c("one", 1.0),
             _c("half", 0.5)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1/MatMul"),
             helper.make_node("Add", ["b1", "h0"], ["h"], name="fc1/Add")]
    if act == "gelu":
        nodes += [helper.make_node("Div", ["h", "root2"], ["d"], name="act/Div"),
                  helper.make_node("Erf", ["d"], ["e"], name="act/Erf"),
                  helper.make_node("Add", ["e", "one"], ["a"], name="act/Add"),
                  helper.make_node("Mul", ["h", "a"], ["m"], name="act/Mul"),
                  helper.make_node("Mul", ["m", "half"], ["act"], name="act/Mul_1")]
    else:
        nodes += [helper.make_node("Sigmoid", ["h"], ["s"], name="act/Sigmoid"),
                  helper.make_node("Mul", ["h", "s"], ["act"], name="act/Mul")]
    nodes.append(helper.make_node("MatMul", ["act", "w2"], ["out"], name="fc2/MatMul"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, hidden])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_after_quantize_lint_clean_and_fully_covered(act):
    model = mlp_model(act=act)
    data = {"x": np.random.default_rng(1).normal(size=(32, 4, 16)).astype(np.float32)}
    out = quantize(model, data, recipe=["quantize", "dulut"], batch_size=8, show_progress=False, log=lambda *_: None)
    assert_lint_clean(out)
    info = inspect_model(load_model(out))
    assert info.nonlinear_ops == 1 and info.nonlinear_replaced == 1 and info.nonlinear_coverage == 1.0
    assert info.replacements == 1 and len(info.fidelity) == 1
    w8a8 = quantize(model, data, recipe=["quantize"], batch_size=8, show_progress=False, log=lambda *_: None)
    ref, got = run(w8a8, data)[0], run(out, data)[0]  # what the table changes, on top of W8A8
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.02


def test_lut8_on_int8_input_is_exact_per_code():
    """ORT-CPU quantizes the Sigmoid's input (UINT8): the 256-entry table reproduces f on every code."""
    model = mlp_model(act="silu")
    data = {"x": np.random.default_rng(2).normal(size=(32, 4, 16)).astype(np.float32)}
    # SiLU as x·Sigmoid(x): with ort-cpu the Sigmoid's input and output are quantized
    out = quantize(model, data, recipe=["quantize", {"dulut": {"lut8": True, "functions": ["sigmoid", "silu"]}}],
                   target="ort-cpu", batch_size=8, show_progress=False, log=lambda *_: None)
    entries = list(_fidelity(out).values())
    assert [e["method"] for e in entries] == ["lut8"] and entries[0]["function"] == "sigmoid"
    assert entries[0]["max_steps"] < 1e-3 and entries[0]["input_quantized"]
    assert "Sigmoid" not in {n.op_type for n in out.graph.node}
    assert np.all(np.isfinite(run(out, data)[0]))


def test_quantize_input_gives_lut8_tables():
    model = mlp_model(act="gelu")
    data = {"x": np.random.default_rng(3).normal(size=(32, 4, 16)).astype(np.float32)}
    out = quantize(model, data, recipe=["quantize", {"dulut": {"quantize_input": True}}], batch_size=8,
                   show_progress=False, log=lambda *_: None)
    assert_lint_clean(out)
    (entry,) = _fidelity(out).values()
    assert entry["method"].startswith("lut8") and entry["input_quantized"]
    assert entry["max_steps"] < 2.0  # the table is exact per code; this is the input's INT8 rounding
    gathers = [n for n in out.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1
    info = inspect_model(load_model(out))
    # the table counts as one op, and it reads INT8 (the bias Add is the one float op: TensorRT fuses it)
    assert info.quantized_op_counts.get("(replacement)") == 1 and info.coverage_by_count == 0.75


def test_uniform_table_option_and_bad_options():
    out = _dulut(functions_model(), steps=({"dulut": {"table": "uniform", "entries": [64], "functions": ["exp"]}},))
    (entry,) = _fidelity(out).values()
    assert entry["method"] == "uniform 64" and entry["function"] == "exp"
    from onnxq.errors import OnnxqError
    from onnxq.pipeline import make_pass
    with pytest.raises(OnnxqError):
        make_pass("dulut", {"functions": ["cosh"]})
    with pytest.raises(OnnxqError):
        make_pass("dulut", {"table": "triple"})


def test_inspect_prints_fidelity(tmp_path, capsys):
    from onnxq.cli.main import main

    path = tmp_path / "m.onnx"
    data = {"x": np.random.default_rng(1).normal(size=(16, 4, 16)).astype(np.float32)}
    onnx.save(quantize(mlp_model(), data, recipe=["dulut"], batch_size=8, show_progress=False, log=lambda *_: None),
              str(path))
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "nonlinear-op coverage: 100.0% of 1" in text and "dulut 32+32" in text and "INT8 output steps" in text


def test_per_channel_scaled_gelu_from_smoothing():
    """smooth folds s into GELU's Erf divisor: x·½(1 + erf(x/(√2/s))) = GELU(s·x)/s per channel."""
    rng = np.random.default_rng(0)
    s = rng.uniform(0.3, 3.0, 8).astype(np.float32)
    inits = [_c("div", math.sqrt(2) / s), _c("one", 1.0), _c("half", 0.5)]
    nodes = [helper.make_node("Div", ["x", "div"], ["d"], name="sgelu/Div"),
             helper.make_node("Erf", ["d"], ["e"], name="sgelu/Erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="sgelu/Add"),
             helper.make_node("Mul", ["x", "a"], ["m"], name="sgelu/Mul"),
             helper.make_node("Mul", ["m", "half"], ["y"], name="sgelu/Mul_1")]
    graph = helper.make_graph(nodes, "sgelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    data = {"x": (rng.normal(size=(64, 8)) * 2).astype(np.float32)}
    out = quantize(model, data, recipe=["dulut"], batch_size=16, show_progress=False, log=lambda *_: None)
    (entry,) = _fidelity(out).values()
    assert entry["function"] == "gelu" and "per-channel" in entry["method"] and entry["max_steps"] < 1
    assert "Erf" not in {n.op_type for n in out.graph.node}
    x = (rng.normal(size=(32, 8)) * 2).astype(np.float32)
    ref, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
    step = entry["output_step"] / s  # the table's step, per channel, in output units
    assert np.all(np.abs(got - ref) <= step)
