"""onnxq.analysis.structure on small transformer graphs: torch exports (legacy and dynamo) and onnx.helper norms."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, mobilenet_block_model
from onnxq.analysis import structure
from onnxq.ir.modelio import load_model
from transformer_builders import export, tiny_bert, tiny_gpt, tiny_llama


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("structure")
    return {"llama": export(tiny_llama(), d / "llama.onnx", "llama"),
            "bert": export(tiny_bert(), d / "bert.onnx", "bert"),
            "gpt": export(tiny_gpt(), d / "gpt.onnx", "gpt")}


def check_llama(s: structure.Structure):
    assert s.is_transformer
    assert len(s.attentions) == 2
    a = s.attentions[0]
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope) == (4, 2, 16, True)
    assert a.o is not None and a.v_path_plain
    assert {n.kind for n in s.norms} == {"rms"} and len(s.norms) == 5
    assert {m.kind for m in s.mlps} == {"swiglu"} and len(s.mlps) == 2
    st = s.stream
    assert st is not None and st.pre_norm and st.rotatable, st and st.problems
    assert len(st.adds) == 4 and len(st.writers) == 4 and len(st.norms) == 5
    assert s.lm_head is not None and s.lm_head.out_features == 96
    assert all(n.scale is not None for n in s.norms)  # γ recognised on every RMSNorm


def test_llama_legacy_export(exports):
    check_llama(structure.analyse(load_model(exports["llama"])))


@pytest.mark.slow
def test_llama_dynamo_export(tmp_path):
    path = export(tiny_llama(), tmp_path / "llama_dynamo.onnx", "llama", dynamo=True)
    model = load_model(path)
    s = structure.analyse(model)
    assert s.is_transformer and len(s.attentions) == 2 and len(s.norms) == 5
    # the dynamo export reads the tied LM head through a Transpose: a linear layer once constants are folded
    from onnxq.pipeline import PassContext, load_recipe, run_pipeline

    _, passes = load_recipe(["lift_constants", "fold_constants"])
    run_pipeline(model, passes, PassContext(show_progress=False), verify_exact=False)
    check_llama(structure.analyse(model))


def test_bert_post_norm(exports):
    s = structure.analyse(load_model(exports["bert"]))
    assert s.is_transformer and len(s.attentions) == 2
    a = s.attentions[0]
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope) == (4, 4, 16, False)
    assert {n.form for n in s.norms} == {"LayerNormalization"} and len(s.norms) == 5
    assert all(m.kind == "gelu" and m.gelu_divisor is not None for m in s.mlps) and len(s.mlps) == 2
    assert len(s.embeddings) == 3 and len(s.stream.embeddings) == 3
    assert not s.stream.pre_norm and not s.stream.rotatable
    assert "post-norm" in s.stream.problems[0]


def test_gpt_pre_layernorm(exports):
    s = structure.analyse(load_model(exports["gpt"]))
    assert s.stream.pre_norm and s.stream.rotatable, s.stream.problems
    assert {n.kind for n in s.norms} == {"layer"} and len(s.norms) == 5
    assert {m.kind for m in s.mlps} == {"gelu"}
    assert s.lm_head is not None


def test_find_softmaxes_and_norms_entry_points(exports):
    model = load_model(exports["llama"])
    assert len(structure.find_softmaxes(model)) == 2
    assert len(structure.find_norms(model)) == 5
    assert structure.is_transformer(model)
    assert not structure.is_transformer(load_model(mobilenet_block_model()))


# --- norm forms built with onnx.helper -------------------------------------------------------------

D = 8


def _norm_graph(nodes, inits, opset=18, domain_ops=()):
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None), k)
             for k, v in inits.items()]
    inits.append(numpy_helper.from_array(np.random.default_rng(0).normal(size=(D, 4)).astype(np.float32), "W"))
    nodes = [*nodes, helper.make_node("MatMul", ["y", "W"], ["out"], name="linear")]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, D])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def _rms(variant: str, axis: int = -1, two: float = 2.0, eps: float = 1e-6, one: float = 1.0):
    inits = {"two": np.array(two), "eps": np.array(eps), "one": np.array(one), "axes": np.array([axis]),
             "gamma": np.linspace(0.5, 2, D)}
    n = [helper.make_node("Pow", ["x", "two"], ["sq"]) if variant != "mulsq" else helper.make_node("Mul", ["x", "x"], ["sq"]),
         helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
         helper.make_node("Add", ["ms", "eps"], ["mse"]),
         helper.make_node("Sqrt", ["mse"], ["rms"])]
    if variant == "div":
        n.append(helper.make_node("Div", ["x", "rms"], ["xn"]))
    elif variant in ("reciprocal", "mulsq"):
        n += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["inv", "x"], ["xn"])]
    else:  # div(1, ·) as the legacy exporter writes rsqrt
        n += [helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["xn"])]
    n.append(helper.make_node("Mul", ["gamma", "xn"], ["y"]))
    return _norm_graph(n, inits)


@pytest.mark.parametrize("variant", ["div", "reciprocal", "one_over", "mulsq"])
def test_decomposed_rmsnorm_forms(variant):
    model = load_model(_rms(variant))
    norms = structure.find_norms(model)
    assert len(norms) == 1
    n = norms[0]
    assert (n.kind, n.form, n.input.name, n.output.name, n.scale.name) == ("rms", "decomposed", "x", "y", "gamma")
    assert n.epsilon == pytest.approx(1e-6)


def test_rmsnorm_over_another_axis_is_rejected_with_reason():
    rejected = []
    assert structure.find_norms(load_model(_rms("div", axis=1)), rejected) == []
    assert rejected and "last axis" in rejected[0].why


@pytest.mark.parametrize("variant,change,reason", [("div", {"two": 3.0}, "exponent other than 2"),
                                                   ("reciprocal", {"eps": 0.5}, "ε is not a small"),
                                                   ("one_over", {"one": 2.0}, "c ≠ 1")])
def test_decomposed_rmsnorm_check_gives_its_reason(variant, change, reason):
    rejected = []
    assert structure.find_norms(load_model(_rms(variant, **change)), rejected) == []
    assert [r.what for r in rejected] == ["rms norm"] and reason in rejected[0].why


def _gelu_mlp(root2: float):
    """x·W1 → 0.5·h·(1 + erf(h/root2)) → ·W2, as torch's legacy exporter writes GELU."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(D, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(16, D)).astype(np.float32), "W2"),
             *(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
               {"root2": root2, "one": 1.0, "half": 0.5}.items())]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Div", ["h", "root2"], ["s"]),
             helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"]),
             helper.make_node("Mul", ["h", "p"], ["hp"]), helper.make_node("Mul", ["hp", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "W2"], ["out"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", D])], inits)
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION))


def test_erf_gelu_mlp_needs_root_two_inside_erf():
    s = structure.analyse(_gelu_mlp(float(np.sqrt(2.0))))
    assert [(m.kind, m.up.node.outputs[0].name, m.down.output.name, m.gelu_divisor.outputs[0].name) for m in s.mlps] \
        == [("gelu", "h", "out", "s")]
    assert structure.analyse(_gelu_mlp(2.0)).mlps == []  # erf(h/2) is not GELU


def test_decomposed_layernorm_and_fused_forms():
    inits = {"two": np.array(2.0), "eps": np.array(1e-5), "axes": np.array([-1]), "gamma": np.linspace(0.5, 2, D),
             "beta": np.linspace(-1, 1, D)}
    n = [helper.make_node("ReduceMean", ["x", "axes"], ["mu"], keepdims=1), helper.make_node("Sub", ["x", "mu"], ["d"]),
         helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
         helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
         helper.make_node("Div", ["d", "sd"], ["xn"]), helper.make_node("Mul", ["xn", "gamma"], ["g"]),
         helper.make_node("Add", ["g", "beta"], ["y"])]
    norms = structure.find_norms(load_model(_norm_graph(n, inits)))
    assert [(x.kind, x.form, x.scale.name, x.bias.name, x.output.name) for x in norms] == \
           [("layer", "decomposed", "gamma", "beta", "y")]
    fused = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-6)]
    norms = structure.find_norms(load_model(_norm_graph(fused, {"gamma": np.ones(D)})))
    assert [(x.kind, x.form) for x in norms] == [("rms", "SimplifiedLayerNormalization")]
    fused = [helper.make_node("RMSNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-6)]
    norms = structure.find_norms(load_model(_norm_graph(fused, {"gamma": np.ones(D)}, opset=23)))
    assert [(x.kind, x.form) for x in norms] == [("rms", "RMSNormalization")]
