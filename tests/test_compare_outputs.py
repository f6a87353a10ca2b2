"""compare understands its outputs: integer outputs as counts of differing elements, top-1 agreement only
for class distributions, padded positions left out, and results that do not depend on the batch size."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import mobilenet_block_model, random_images
from conftest import cli, run
from onnxq import quantize
from onnxq.analysis.compare import compare_models

H, V, S = 8, 6, 5  # hidden size, classes (vocabulary), sequence length


def heads_model(shift: float = 0.0) -> onnx.ModelProto:
    """x [b, s, H] → states = x·W [b, s, H]; logits = states·U [b, s, V] read by ArgMax → ids (int64);
    probs = Softmax(mean over s of logits) [b, V]; embedding = LpNormalization(mean over s of states)
    [b, H]; scores = Gemm(mean over s of x) [b, V]. `shift` perturbs W like quantization would."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(H, H)).astype(np.float32) + np.float32(shift) * rng.normal(size=(H, H)).astype(np.float32)
    u = rng.normal(size=(H, V)).astype(np.float32)
    g = rng.normal(size=(H, V)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["states"], name="proj"),
             helper.make_node("MatMul", ["states", "U"], ["logits"], name="head"),
             helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=0, name="argmax"),
             helper.make_node("ReduceMean", ["logits"], ["pooled_logits"], axes=[1], keepdims=0, name="pool_logits"),
             helper.make_node("Softmax", ["pooled_logits"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("ReduceMean", ["states"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             helper.make_node("LpNormalization", ["pooled"], ["embedding"], axis=-1, p=2, name="normalize"),
             helper.make_node("ReduceMean", ["x"], ["pooled_x"], axes=[1], keepdims=0, name="pool_x"),
             helper.make_node("Gemm", ["pooled_x", "G"], ["scores"], name="classifier")]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "heads", [helper.make_tensor_value_info("x", f, ["b", S, H])],
        [helper.make_tensor_value_info("states", f, ["b", S, H]), helper.make_tensor_value_info("logits", f, ["b", S, V]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", S]), helper.make_tensor_value_info("probs", f, ["b", V]),
         helper.make_tensor_value_info("embedding", f, ["b", H]), helper.make_tensor_value_info("scores", f, ["b", V])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U"), numpy_helper.from_array(g, "G")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


DATA = {"x": np.random.default_rng(1).normal(size=(10, S, H)).astype(np.float32)}


def by_name(result) -> dict:
    return {o["name"]: o for o in result["outputs"]}


def test_identical_integer_outputs_are_identical_not_cosine_zero():
    result = compare_models(ir.from_proto(heads_model()), ir.from_proto(heads_model()), DATA, show_progress=False)
    ids = by_name(result)["ids"]
    assert ids["kind"] == "integer" and ids["verdict"] == "identical" and ids["differing"] == 0
    assert ids["elements"] == 10 * S and ids["cosine"] is None and ids["sqnr_db"] is None


def test_differing_integer_outputs_are_counted():
    ref, perturbed = heads_model(), heads_model(shift=0.3)
    expected = int(np.sum(run(ref, DATA)[2] != run(perturbed, DATA)[2]))
    assert 0 < expected < 10 * S  # the perturbation moves some argmaxes, not all
    ids = by_name(compare_models(ir.from_proto(ref), ir.from_proto(perturbed), DATA, show_progress=False))["ids"]
    assert ids["differing"] == expected and ids["verdict"] == f"{expected} of {10 * S} elements differ"


def test_top1_only_for_class_distributions():
    ref, perturbed = heads_model(), heads_model(shift=0.3)
    outputs = by_name(compare_models(ir.from_proto(ref), ir.from_proto(perturbed), DATA, show_progress=False))
    assert outputs["probs"]["classes"] == "Softmax over the last axis"
    assert outputs["logits"]["classes"] == "read by ArgMax over the last axis"
    assert outputs["scores"]["classes"] == "[batch, classes] logits of a Gemm head"
    for name in ("states", "embedding"):  # [b, s, hidden] states and a normalised embedding
        assert outputs[name]["classes"] == "not a class distribution" and outputs[name]["top1_agreement"] is None
    ref_out, q_out = run(ref, DATA), run(perturbed, DATA)
    for index, name in ((1, "logits"), (3, "probs"), (5, "scores")):
        expected = float(np.mean(ref_out[index].argmax(-1) == q_out[index].argmax(-1)))
        assert outputs[name]["top1_agreement"] == pytest.approx(expected)
    assert outputs["logits"]["top1_agreement"] == pytest.approx(1 - outputs["ids"]["differing"] / (10 * S))


@pytest.mark.parametrize("batch_size", [2, 5, 10])
def test_batch_size_does_not_change_the_results(batch_size):
    qmodel = quantize(mobilenet_block_model(), {"input": random_images(16, seed=1)}, show_progress=False,
                      log=lambda *_: None)
    data = {"input": random_images(10, seed=4)}
    one = compare_models(ir.from_proto(mobilenet_block_model()), ir.from_proto(qmodel), data, show_progress=False)
    many = compare_models(ir.from_proto(mobilenet_block_model()), ir.from_proto(qmodel), data, batch_size=batch_size,
                          show_progress=False)
    assert one["samples"] == many["samples"] == 10
    for a, b in zip(one["outputs"], many["outputs"]):
        for key in ("cosine", "sqnr_db", "max_abs_error", "top1_agreement"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert [r["tensor"] for r in one["layers"]] == [r["tensor"] for r in many["layers"]]
    for a, b in zip(one["layers"], many["layers"]):
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], rel=1e-5)


def masked_model(padding_noise: float) -> onnx.ModelProto:
    """hidden = x·W + (1 − attention_mask)·noise, noise = padding_noise·(a vector of H normals):
    identical to x·W at the real positions."""
    w = np.random.default_rng(2).normal(size=(H, H)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Sub", ["one", "m"], ["pad"], name="invert"),
             helper.make_node("Unsqueeze", ["pad", "last"], ["pad3"], name="unsqueeze"),
             helper.make_node("Mul", ["pad3", "noise"], ["pad_noise"], name="scale"),
             helper.make_node("Add", ["xw", "pad_noise"], ["hidden"], name="add"),
             helper.make_node("ArgMax", ["hidden"], ["token_ids"], axis=-1, keepdims=0, name="argmax")]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", S, H]),
                          helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", S])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", S, H]),
         helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["b", S])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1, np.float32), "one"),
         numpy_helper.from_array(noise(padding_noise), "noise"),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def noise(size: float) -> np.ndarray:
    return (size * np.random.default_rng(5).normal(size=H)).astype(np.float32)


def padded_data() -> dict[str, np.ndarray]:
    mask = np.ones((6, S), np.int64)
    mask[:, 3:] = 0  # the last two positions of every sample are padding
    return {"x": np.random.default_rng(3).normal(size=(6, S, H)).astype(np.float32), "attention_mask": mask}


def test_padded_positions_are_left_out(tmp_path, capsys):
    onnx.save(masked_model(0.0), tmp_path / "ref.onnx")
    onnx.save(masked_model(50.0), tmp_path / "other.onnx")  # differs only at padded positions
    np.savez(tmp_path / "data.npz", **padded_data())

    code, text, _ = cli(capsys, "compare", tmp_path / "ref.onnx", tmp_path / "other.onnx", "--data", tmp_path / "data.npz",
                        "--json", tmp_path / "auto.json", "--batch-size", "3")
    auto = json.loads((tmp_path / "auto.json").read_text())
    assert code == 0 and "'attention_mask' is 0 left out" in text and "identical" in text
    outputs = by_name(auto)
    assert auto["padding_mask"] == "attention_mask"
    assert outputs["hidden"]["sqnr_db"] == "inf" and outputs["hidden"]["cosine"] == pytest.approx(1.0)  # JSON: a string
    assert outputs["hidden"]["max_abs_error"] == 0 and outputs["hidden"]["elements"] == 6 * 3 * H
    assert outputs["token_ids"]["verdict"] == "identical" and outputs["token_ids"]["elements"] == 6 * 3

    code, text, _ = cli(capsys, "compare", tmp_path / "ref.onnx", tmp_path / "other.onnx", "--data", tmp_path / "data.npz",
                        "--json", tmp_path / "all.json", "--padding-mask", "none")
    every = by_name(json.loads((tmp_path / "all.json").read_text()))
    assert code == 0 and every["hidden"]["sqnr_db"] < 0 and every["hidden"]["max_abs_error"] == pytest.approx(np.abs(noise(50.0)).max())
    changed = int(np.sum(run(masked_model(0.0), padded_data())[1] != run(masked_model(50.0), padded_data())[1]))
    assert changed > 0 and every["token_ids"]["verdict"] == f"{changed} of {6 * S} elements differ"

    code, _, err = cli(capsys, "compare", tmp_path / "ref.onnx", tmp_path / "other.onnx", "--data", tmp_path / "data.npz",
                       "--padding-mask", "x")
    assert code == 1 and "padding mask 'x' is not a rank-2 integer or bool model input" in err


def test_cli_table_names_what_each_output_is(tmp_path, capsys):
    onnx.save(heads_model(), tmp_path / "ref.onnx")
    onnx.save(heads_model(shift=0.3), tmp_path / "other.onnx")
    np.savez(tmp_path / "data.npz", **DATA)
    code, text, _ = cli(capsys, "compare", tmp_path / "ref.onnx", tmp_path / "other.onnx", "--data", tmp_path / "data.npz",
                        "--layers", "0")
    rows = {line.split()[0]: line for line in text.splitlines()[3:] if line.strip()}
    assert code == 0 and "elements differ" in rows["ids"] and "integer" not in rows["ids"].split()[1]
    assert rows["embedding"].endswith("not a class distribution") and rows["probs"].endswith("%")


def test_a_batch_size_that_leaves_a_remainder_says_so(tmp_path, capsys):
    onnx.save(mobilenet_block_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", input=random_images(10, seed=4))
    code, text, err = cli(capsys, "compare", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "data.npz",
                          "--batch-size", "4", "-q")
    assert code == 0 and text.startswith("8 samples")
    assert err == ("onnxq: warning: compare: 10 samples do not split into batches of 4: the last 2 are left out "
                   "(a batch size that divides 10 uses all)\n")


def test_non_finite_layers_rank_last_and_the_json_is_standard(tmp_path, capsys):
    """A -inf attention-style mask makes inf - inf = NaN in that layer's error: it must neither head the
    worst-layer list nor leak a numpy warning, and --json must stay standard JSON."""
    import json
    import warnings

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["scores"], name="mm"),
             helper.make_node("Cast", ["keep"], ["keep_b"], to=TensorProto.BOOL, name="cast"),
             helper.make_node("Where", ["keep_b", "scores", "neg_inf"], ["masked"], name="mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8]),
                                                helper.make_tensor_value_info("keep", TensorProto.INT64, ["B", 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    keep = (rng.uniform(size=(16, 8)) > 0.3).astype(np.int64)
    keep[:, 0] = 1
    data = {"x": rng.normal(size=(16, 8)).astype(np.float32), "keep": keep}
    np.savez(tmp_path / "d.npz", **data)
    code, _, _ = cli(capsys, "quantize", tmp_path / "m.onnx", "--calib", tmp_path / "d.npz", "-o", tmp_path / "q.onnx",
                     "-q", "--padding-mask", "none", "--allow-unknown-ops")
    assert code in (0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code, _, _ = cli(capsys, "compare", tmp_path / "m.onnx", tmp_path / "q.onnx", "--data", tmp_path / "d.npz",
                         "--padding-mask", "none", "--layers", "-1", "--json", tmp_path / "c.json")
    assert code == 0
    result = json.loads((tmp_path / "c.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    values = [row["sqnr_db"] for row in result["layers"]]
    finite = [v for v in values if isinstance(v, float)]
    assert finite == sorted(finite) and values[:len(finite)] == finite  # finite ones first, worst first
    assert "nan" in values and values[-1] == "nan"
