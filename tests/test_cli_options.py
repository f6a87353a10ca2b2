"""Options users of ONNX Runtime's quantize_static and ModelOpt expect: --exclude, --op-types,
--log-level, and lint profiles by target. Each quantized model is run in ONNX Runtime."""

import logging

import numpy as np
import onnx
import pytest

import onnxq
from builders import mobilenet_block_model, random_images
from conftest import assert_lint_clean, cli, run, sqnr_db
from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.ir.modelio import load_model
from onnxq.metadata import FLOAT_REASON_KEY
from onnxq.quant.lint import lint

EVAL = random_images(8, seed=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    onnx.save(mobilenet_block_model(), tmp / "model.onnx")
    np.savez(tmp / "calib.npz", input=random_images(16, seed=1))
    return tmp


def quantize_cli(capsys, files, out, *options):
    return cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", files / out, *options)


def usage_error(capsys, *argv) -> tuple[int, str]:
    """A command line argparse refuses: (exit status, stderr)."""
    with pytest.raises(SystemExit) as caught:
        cli(capsys, *argv)
    return caught.value.code, capsys.readouterr().err


def reads_dequantized(model: onnx.ModelProto, node_name: str) -> list[bool]:
    """For each input of the node: does a DequantizeLinear produce it (is it quantized)?"""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return [producers.get(i) == "DequantizeLinear" for i in node.input[:2]]


def float_sqnr(path) -> float:
    ref = run(mobilenet_block_model(), {"input": EVAL})[0]
    return sqnr_db(ref, run(path, {"input": EVAL})[0])


def test_exclude_a_node_by_name_keeps_it_float_and_says_why_lint_fails(files, capsys):
    code, out, err = quantize_cli(capsys, files, "no_fc.onnx", "--exclude", "fc/Gemm", "-q")
    model = onnx.load(files / "no_fc.onnx")
    assert code == 4 and out == ""  # written, but TensorRT rule R8 fails: the documented status
    assert reads_dequantized(model, "fc/Gemm") == [False, False]
    assert reads_dequantized(model, "stem/Conv") == [True, True]
    # one line per failing rule, under -q too: the rule, the node, and that the user's exclusion caused it
    assert err.count("\n") == 1 and err.startswith("onnxq: lint failed: wrote ")
    assert "rule R8" in err and "'fc/Gemm'" in err and "kept in float by your exclusion" in err
    assert float_sqnr(files / "no_fc.onnx") > 25


def test_exclude_by_regex_and_repeated(files, capsys):
    code, _, err = quantize_cli(capsys, files, "no_expand.onnx", "--exclude", "expand/.*", "--exclude", "fc/Gemm",
                                "--log-level", "error")
    model = onnx.load(files / "no_expand.onnx")
    assert code == 4 and "'expand/Conv'" in err and "'fc/Gemm'" in err
    assert reads_dequantized(model, "expand/Conv") == [False, False]
    assert reads_dequantized(model, "depthwise/Conv") == [True, True]
    failing = {r.rule: r.nodes for r in lint(load_model(files / "no_expand.onnx")) if r.status == "FAIL"}
    assert set(failing) == {"R8"} and set(failing["R8"]) == {"expand/Conv", "fc/Gemm"}
    assert float_sqnr(files / "no_expand.onnx") > 25


def test_exclude_that_matches_nothing_is_a_warning_shown_under_quiet(files, capsys):
    code, out, err = quantize_cli(capsys, files, "typo.onnx", "--exclude", "fc/Gmm", "-q")
    assert code == 0 and out == "" and (files / "typo.onnx").exists()
    assert err == "onnxq: warning: exclude: no node is named or matches 'fc/Gmm' (did you mean 'fc/Gemm'?); ignored\n"
    assert_lint_clean(onnx.load(files / "typo.onnx"))  # nothing excluded: every weighted layer quantized
    code, _, err = quantize_cli(capsys, files, "typo.onnx", "--exclude", "fc/Gmm", "--log-level", "error")
    assert code == 0 and err == ""  # --log-level error silences warnings too


def test_exclude_of_a_node_an_earlier_pass_folds_is_a_warning(files, capsys):
    """BatchNormalization nodes exist in the input model but are folded before quantization."""
    code, out, err = quantize_cli(capsys, files, "bn.onnx", "--exclude", "stem/BatchNormalization", "--calibrator", "auto",
                                  "-q")
    assert code == 0 and out == ""
    assert err == ("onnxq: warning: quantize: exclude: no node is named or matches 'stem/BatchNormalization' after "
                   "the earlier passes (they removed or replaced the nodes it named); skipped\n")  # once, not per trial
    assert_lint_clean(onnx.load(files / "bn.onnx"))
    # the recipe's own patterns stay strict: a typo there is still an error
    (files / "typo.yaml").write_text("passes:\n  - include: default\n    override:\n      quantize: {exclude: [fc/Gem]}\n")
    code, _, err = quantize_cli(capsys, files, "typo_recipe.onnx", "--recipe", files / "typo.yaml", "--exclude", "fc/Gemm")
    assert code == 1 and "no node is named or matches 'fc/Gem' (did you mean 'fc/Gemm'?)" in err


def test_bad_regex_is_a_usage_error(files, capsys):
    code, err = usage_error(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz",
                            "-o", files / "bad.onnx", "--exclude", "conv[")
    assert code == 2 and err.count("\n") == 1 and "'conv[' is not a valid regular expression" in err
    assert not (files / "bad.onnx").exists()


def test_op_types_quantizes_only_those(files, capsys):
    code, _, err = quantize_cli(capsys, files, "conv_only.onnx", "--op-types", "Conv", "--op-types", "Softmax", "-q")
    model = onnx.load(files / "conv_only.onnx")
    assert code == 4 and "'fc/Gemm'" in err and "kept in float by your exclusion" in err
    assert "onnxq: warning: op_types: the model has no Softmax node" in err
    assert all(reads_dequantized(model, f"{name}/Conv") == [True, True] for name in ("stem", "expand", "project"))
    assert reads_dequantized(model, "fc/Gemm") == [False, False]
    reasons = {n.name: {p.key: p.value for p in n.metadata_props}.get(FLOAT_REASON_KEY) for n in model.graph.node}
    assert reasons["block/Add"] == reasons["fc/Gemm"] == "excluded by the user"
    assert float_sqnr(files / "conv_only.onnx") > 25

    code, _, err = quantize_cli(capsys, files, "two.onnx", "--op-types", "Conv,Gemm", "-q")
    assert code == 0 and err == ""
    assert_lint_clean(onnx.load(files / "two.onnx"))


def test_empty_op_type_is_a_usage_error(files, capsys):
    code, err = usage_error(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz",
                            "-o", files / "x.onnx", "--op-types", "Conv,,Gemm")
    assert code == 2 and "empty op type" in err


def test_api_takes_the_same_options(files, caplog):
    data = {"input": random_images(16, seed=1)}
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        proto = onnxq.quantize(mobilenet_block_model(), data, exclude=["fc/Gemm", "nothing"], op_types=["Conv", "Gemm"],
                               show_progress=False, log=lambda *_: None)
    assert [r.getMessage() for r in caplog.records] == ["exclude: no node is named or matches 'nothing'; ignored"]
    assert reads_dequantized(proto, "fc/Gemm") == [False, False] and reads_dequantized(proto, "stem/Conv") == [True, True]
    quantize_step = next(p for p in onnxq.pipeline.read_record(load_model(proto)) if p["name"] == "quantize")
    assert quantize_step["options"]["exclude"] == ["fc/Gemm"] and quantize_step["options"]["op_types"] == ["Conv", "Gemm"]

    for kwargs, error, text in [({"exclude": "fc/Gemm"}, OnnxqTypeError, "exclude: expected a list"),
                                ({"exclude": ["("]}, OnnxqValueError, "not a valid regular expression"),
                                ({"op_types": [""]}, OnnxqValueError, "op_types: an empty string"),
                                ({"op_types": "Conv"}, OnnxqTypeError, "op_types: expected a list")]:
        with pytest.raises(error, match=text):
            onnxq.quantize(mobilenet_block_model(), data, show_progress=False, log=lambda *_: None, **kwargs)


def test_a_recipe_exclude_and_the_option_join(files, capsys):
    (files / "recipe.yaml").write_text("passes:\n  - include: default\n    override:\n      quantize: {exclude: [fc/Gemm]}\n")
    code, _, err = quantize_cli(capsys, files, "both.onnx", "--recipe", files / "recipe.yaml", "--exclude", "project/Conv",
                                "-q")
    assert code == 4 and "'project/Conv'" in err and "'fc/Gemm'" in err
    model = onnx.load(files / "both.onnx")
    assert reads_dequantized(model, "project/Conv") == [False, False] and reads_dequantized(model, "fc/Gemm") == [False, False]


def test_log_levels(files, capsys):
    code, out, err = quantize_cli(capsys, files, "info.onnx")
    assert code == 0 and "wrote" in out and "quantized ops" in out and "debug" not in err
    code, out, err = quantize_cli(capsys, files, "warn.onnx", "--log-level", "warning")
    assert code == 0 and out == "" and err == ""
    code, out, err = quantize_cli(capsys, files, "debug.onnx", "--log-level", "debug")
    assert code == 0 and "wrote" in out
    details = [line for line in err.splitlines() if line.startswith("onnxq: debug: pass ")]
    assert len(details) == 7 and any("quantize (approximate" in line and '"calibrator": "percentile"' in line
                                     for line in details)
    assert np.array_equal(run(files / "info.onnx", {"input": EVAL})[0], run(files / "debug.onnx", {"input": EVAL})[0])

    for argv in (["lint", files / "info.onnx"], ["inspect", files / "info.onnx"], ["recipes"],
                 ["compare", files / "model.onnx", files / "info.onnx", "--data", files / "calib.npz"]):
        code, out, _ = cli(capsys, *argv, "--log-level", "debug")
        assert code == 0 and out
    code, err = usage_error(capsys, "lint", files / "info.onnx", "--log-level", "loud")
    assert code == 2 and "invalid choice: 'loud'" in err


def test_ort_cpu_model_lints_clean_under_its_own_profile(files, capsys):
    code, out, err = quantize_cli(capsys, files, "cpu.onnx", "--target", "ort-cpu")
    assert code == 0 and "ort-cpu lint: pass" in out, err
    assert float_sqnr(files / "cpu.onnx") > 20
    code, out, _ = cli(capsys, "lint", files / "cpu.onnx", "--target", "ort-cpu")
    assert code == 0 and "PASS: 0 error(s), 0 warning(s)" in out
    code, out, _ = cli(capsys, "lint", files / "cpu.onnx")  # the TensorRT profile still refuses UINT8 and zero points
    assert code == 4 and "R1 " in out and "R1b" in out


def test_ort_cpu_profile_accepts_what_the_target_keeps_float_on_purpose():
    """ConvTranspose (no ORT integer kernel) stays float and Add/Mul constants are UINT8: clean for ort-cpu."""
    from test_ort_cpu_target import CALIB, ppocr_like_model
    from test_ort_cpu_target import EVAL as IMAGES

    proto = onnxq.quantize(ppocr_like_model(), CALIB, target="ort-cpu", show_progress=False, log=lambda *_: None)
    model = load_model(proto)
    assert any(n.op_type == "ConvTranspose" for n in proto.graph.node)
    assert [r.rule for r in lint(model, "ort-cpu") if r.status != "pass"] == []
    assert {"R1", "R1b"} <= {r.rule for r in lint(model) if r.status == "FAIL"}
    assert sqnr_db(run(ppocr_like_model(), IMAGES)[0], run(proto, IMAGES)[0]) > 15


def test_profiles_share_one_table():
    model = load_model(mobilenet_block_model())
    trt = [r.rule for r in lint(model)]
    assert trt == ["R1", "R1b", "R2", "R3", "R3b", "R4", "R5", "R6", "F1", "F2", "F3", "F4", "QDQ", "R8", "R8b", "R9",
                   "R11", "R15", "R16", "O2", "R17"]
    cpu = {r.rule: r for r in lint(model, "ort-cpu")}
    assert {"R1", "R1b", "R8", "R9", "R15", "R16", "F2", "F3"}.isdisjoint(cpu)
    assert {"R2", "QDQ", "R8o", "O1", "O3", "F1", "F4", "O2"} <= set(cpu)
    assert cpu["R8o"].status == "FAIL" and "fc/Gemm" in cpu["R8o"].nodes  # a float model is not an ort-cpu model either
    with pytest.raises(OnnxqError, match="no lint profile for target 'gpu'"):
        lint(model, "gpu")


@pytest.mark.parametrize("command, examples", [
    ("quantize", ["--exclude fc/Gemm", "--op-types Conv,MatMul", "--log-level debug", "exclusion"]),
    ("compare", ["--batch-size 16", "--padding-mask attention_mask", "not a class distribution",
                 "N of M elements differ"]),
    ("lint", ["--target ort-cpu", "profiles"]),
    ("inspect", ["--log-level"]),
])
def test_help_teaches_the_new_options(capsys, command, examples):
    with pytest.raises(SystemExit) as caught:
        cli(capsys, command, "--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps option help: compare words, not lines
    assert caught.value.code == 0 and all(" ".join(e.split()) in text for e in examples), text


def test_inspect_says_which_recipe_ran_why_and_for_which_target(files, capsys):
    code, _, _ = quantize_cli(capsys, files, "auto.onnx", "-q")
    assert code == 0
    code, out, _ = cli(capsys, "inspect", files / "auto.onnx")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("recipe: "))
    assert line.startswith("recipe: default (") and "no attention" in line and line.endswith("; target: tensorrt")
    code, _, _ = quantize_cli(capsys, files, "cpu.onnx", "-q", "--recipe", "default", "--target", "ort-cpu")
    assert code == 0
    _, out, _ = cli(capsys, "inspect", files / "cpu.onnx")
    assert "recipe: default (named by the user); target: ort-cpu" in out.splitlines()


def test_quiet_and_a_log_level_together_are_a_usage_error(files, capsys):
    code, err = usage_error(capsys, "inspect", files / "model.onnx", "-q", "--log-level", "debug")
    assert code == 2 and "not allowed with argument -q/--quiet" in err


def test_activation_type_int8_for_ort_cpu_and_uint8_refused_for_tensorrt(files, capsys):
    code, _, err = quantize_cli(capsys, files, "cpu_s8.onnx", "-q", "--target", "ort-cpu", "--activation-type", "int8")
    assert code == 0, err
    model = onnx.load(files / "cpu_s8.onnx")
    zero_points = {t.name: t.data_type for t in model.graph.initializer}
    q_types = {zero_points[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {onnx.TensorProto.INT8}
    assert sqnr_db(run(mobilenet_block_model(), {"input": EVAL})[0], run(model, {"input": EVAL})[0]) > 20
    code, _, err = quantize_cli(capsys, files, "trt_u8.onnx", "--activation-type", "uint8")
    assert code == 1 and "TensorRT takes int8 activations only" in err and not (files / "trt_u8.onnx").exists()


def test_exclude_names_a_node_as_the_input_model_calls_it(files, capsys, tmp_path):
    """Generic exporter names (dynamo's node_*) are renamed by the pipeline; --exclude still finds the node by
    the name the user's model gave it."""
    model = mobilenet_block_model()
    for node in model.graph.node:
        node.name = "node_" + node.name.replace("/", "_").lower()
    onnx.save(model, tmp_path / "generic.onnx")
    code, _, err = cli(capsys, "quantize", tmp_path / "generic.onnx", "--calib", files / "calib.npz",
                       "-o", tmp_path / "q.onnx", "--exclude", "node_fc_gemm")
    out = onnx.load(tmp_path / "q.onnx")
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    meta = {p.key: p.value for p in gemm.metadata_props}
    assert meta.get("onnxq.source_name") == "node_fc_gemm" and gemm.name != "node_fc_gemm"  # renamed, remembered
    assert code == 4 and reads_dequantized(out, gemm.name) == [False, False] and "no node" not in err
    assert meta[FLOAT_REASON_KEY] == "excluded by the user"
