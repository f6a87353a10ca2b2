"""The command line: each bad input gives a one-line error, a non-zero exit and no output file."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from builders import mobilenet_block_model, random_images
from conftest import assert_lint_clean, cli


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(mobilenet_block_model(), model)
    np.savez(tmp_path / "calib.npz", input=random_images(16, seed=1))
    np.savez(tmp_path / "eval.npz", input=random_images(8, seed=2))
    return tmp_path


def test_gptq_rounding_from_the_command_line(files, capsys):
    out = files / "model.gptq.onnx"
    code, _, _ = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", out,
                     "--rounding", "gptq", "--report", files / "report.json", "-q")
    assert code == 0
    summary = next(p for p in json.loads((files / "report.json").read_text())["passes"] if p["name"] == "quantize")["summary"]
    assert summary["gptq_rounded"] == 4  # stem, expand and project Convs and the Gemm; the depthwise Conv stays nearest


def test_full_session(files, capsys):
    out = files / "model.int8.onnx"
    code, text, _ = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", out,
                        "--report", files / "report.json", "-q")
    assert code == 0 and out.exists() and text == ""
    assert_lint_clean(onnx.load(out))
    report = json.loads((files / "report.json").read_text())
    assert report["coverage_by_flops"] > 0.9 and [p["name"] for p in report["passes"]][-2:] == ["quantize", "recentre"]
    assert (report["recipe"], report["target"], report["output"]) == ("default", "tensorrt", str(out))
    assert report["recipe_reason"] == "no attention (no Softmax in the graph)"

    code, text, _ = cli(capsys, "compare", files / "model.onnx", out, "--data", files / "eval.npz", "--json", files / "c.json")
    assert code == 0 and "logits" in text and "SQNR" in text
    assert json.loads((files / "c.json").read_text())["outputs"][0]["sqnr_db"] > 20

    code, text, _ = cli(capsys, "lint", out)
    assert code == 0 and "PASS" in text and "R8" in text

    code, text, _ = cli(capsys, "inspect", out)
    assert code == 0 and "passes applied" in text and "kept in float because" in text and "quantized coverage" in text

    code, text, _ = cli(capsys, "lint", files / "model.onnx")  # the FP32 model breaks R8
    assert code == 4 and "FAIL" in text  # lint failures have their own exit status (docs/guarantees.md)


@pytest.mark.parametrize("case, message", [
    ("missing_model", "no such file"),
    ("text_file", "not a readable ONNX model"),
    ("truncated", "not a readable ONNX model"),
    ("wrong_names", "lacks model input(s)"),
    ("wrong_dtype", "dtype float64"),
    ("empty", "empty"),
    ("same_output", "-o is the input model"),
    ("bad_recipe", "neither a file nor a built-in recipe"),
])
def test_bad_inputs(files, capsys, case, message):
    model, calib, out = files / "model.onnx", files / "calib.npz", files / "out.onnx"
    if case == "missing_model":
        model = files / "nope.onnx"
    elif case == "text_file":
        model = files / "notes.onnx"
        model.write_text("hello, I am not a model\n" * 20)
    elif case == "truncated":
        model = files / "cut.onnx"
        model.write_bytes((files / "model.onnx").read_bytes()[:500])
    elif case == "wrong_names":
        np.savez(calib, image=random_images(4))
    elif case == "wrong_dtype":
        np.savez(calib, input=random_images(4).astype(np.float64))
    elif case == "empty":
        np.savez(calib, input=np.zeros((0, 3, 16, 16), np.float32))
    elif case == "same_output":
        out = model
    extra = ["--recipe", "nonsense"] if case == "bad_recipe" else []
    before = model.read_bytes() if model.exists() else None
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, "-o", out, *extra)
    assert code == 1
    assert message in err and err.startswith("onnxq: error:") and err.count("\n") == 1
    if case == "same_output":
        assert model.read_bytes() == before
    else:
        assert not out.exists()
    assert not list(files.glob(".*.tmp"))  # no half-written temporary left behind


def test_unknown_op_error_and_allow_flag(files, capsys):
    model = mobilenet_block_model()
    model.graph.node.append(onnx.helper.make_node("Mystery", ["logits"], ["m"], domain="acme", name="mystery"))
    model.opset_import.append(onnx.helper.make_opsetid("acme", 1))
    model.graph.output.append(onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [None, 10]))
    onnx.save(model, files / "custom.onnx")
    args = ["quantize", files / "custom.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
            "--recipe", "default", "--no-verify", "-q"]  # ORT cannot run the op, so nothing can be verified
    code, _, err = cli(capsys, *args)
    assert code == 1 and "acme::Mystery" in err and "--allow-unknown-ops" in err


def test_build_engine_without_tensorrt(files, capsys):
    pytest.importorskip("onnxq")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; tests/test_engine.py covers the real build")
    code, _, err = cli(capsys, "build-engine", files / "model.onnx", "-o", files / "m.plan")
    assert code == 1 and "TensorRT is not installed" in err and "pip install" in err
    assert not (files / "m.plan").exists()


def test_help_teaches():
    result = subprocess.run([sys.executable, "-m", "onnxq", "quantize", "--help"], check=False, capture_output=True, text=True)
    assert result.returncode == 0
    for words in ("--calib", "calibrators", "entropy", "targets", "ort-cpu", "examples", "recipes"):
        assert words in result.stdout
    top = subprocess.run([sys.executable, "-m", "onnxq", "--help"], check=False, capture_output=True, text=True).stdout
    assert all(cmd in top for cmd in ("quantize", "compare", "lint", "inspect", "build-engine"))


def test_recipes_lists_builtins(capsys):
    code, text, _ = cli(capsys, "recipes")
    assert code == 0 and "default" in text and "equalize" in text and "exact" in text
    import yaml

    from onnxq.pipeline.recipes import RECIPE_DIR, builtin_recipes

    for name in builtin_recipes():  # every built-in recipe says what it costs in time
        cost = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text()).get("cost")
        assert cost and cost in text, name
