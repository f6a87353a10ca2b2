"""The CLI and API boundary: no destroyed files, outputs checked before any work, every bad input a
one-line error with exit status 1, valid but unusual models accepted (docs/guarantees.md)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from builders import mobilenet_block_model, random_images
from conftest import cli, digest, temp_files
from onnxq.cli.main import EXIT_LINT_FAILED, main
from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.ir.outputs import write_text


@pytest.fixture
def files(tmp_path):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=random_images(8, seed=1))
    return tmp_path


def one_line_error(err: str, *needles: str) -> bool:
    """stderr holds one error line (after any time-stamped progress lines of work done before it)."""
    err = "".join(line for line in err.splitlines(keepends=True) if not re.match(r"\[ *\d+\.\ds\] ", line))
    return err.startswith("onnxq: error: ") and err.count("\n") == 1 and all(n in err for n in needles)




def run_cli(*argv, env=None, preexec_fn=None, timeout=300):
    """onnxq in a subprocess: for exit statuses, signals and process limits."""
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, argv)], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
                          preexec_fn=preexec_fn, timeout=timeout)


# --- no path onnxq writes is a file it reads -------------------------------------------------------

@pytest.mark.parametrize("case", ["report_is_model", "report_is_calib", "report_is_recipe", "output_is_symlink",
                                  "output_is_hard_link", "output_through_dotdot", "report_is_hard_link"])
def test_outputs_never_overwrite_inputs(files, capsys, case):
    model, calib, out, report = files / "model.onnx", files / "calib.npz", files / "out.onnx", files / "r.json"
    recipe = files / "recipe.yaml"
    recipe.write_text("passes:\n  - quantize\n")
    extra = ["--recipe", recipe]
    if case == "report_is_model":
        report = model
    elif case == "report_is_calib":
        report = calib
    elif case == "report_is_recipe":
        report = recipe
    elif case == "output_is_symlink":
        out.symlink_to(model)
    elif case == "output_is_hard_link":
        os.link(model, out)
    elif case == "output_through_dotdot":
        (files / "sub").mkdir()
        out = files / "sub" / ".." / "model.onnx"
    elif case == "report_is_hard_link":
        os.link(model, report)
    inputs = {p: digest(p) for p in (model, calib, recipe)}
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, "-o", out, "--report", report, *extra, "-q")
    assert code == 1 and one_line_error(err, "which this run reads")
    assert {p: digest(p) for p in inputs} == inputs
    assert temp_files(files) == []


def test_output_is_the_inputs_external_data(tmp_path, capsys):
    """A model with its weights in `weights.onnx`: -o weights.onnx would have overwritten them."""
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx", save_as_external_data=True, location="weights.onnx",
              size_threshold=0)
    np.savez(tmp_path / "calib.npz", input=random_images(4, seed=1))
    before = digest(tmp_path / "weights.onnx")
    code, _, err = cli(capsys, "quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz",
                       "-o", tmp_path / "weights.onnx", "-q")
    assert code == 1 and one_line_error(err, "external-data file of the input model")
    # and the sidecar a >2 GiB result would write (OUT.data) may not be it either
    onnx.save(mobilenet_block_model(), tmp_path / "m2.onnx", save_as_external_data=True, location="q.onnx.data",
              size_threshold=0)
    code, _, err = cli(capsys, "quantize", tmp_path / "m2.onnx", "--calib", tmp_path / "calib.npz",
                       "-o", tmp_path / "q.onnx", "-q")
    assert code == 1 and one_line_error(err, "external-data file")
    assert digest(tmp_path / "weights.onnx") == before and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("command", ["inspect", "lint"])
def test_json_of_inspect_and_lint_is_not_the_model(files, capsys, command):
    model = files / "model.onnx"
    before = digest(model)
    code, _, err = cli(capsys, command, model, "--json", model)
    assert code == 1 and one_line_error(err, "--json is the input model") and digest(model) == before


def test_compare_json_is_not_an_input(files, capsys):
    np.savez(files / "eval.npz", input=random_images(4, seed=2))
    before = digest(files / "model.onnx")
    code, _, err = cli(capsys, "compare", files / "model.onnx", files / "model.onnx", "--data", files / "eval.npz",
                       "--json", files / "model.onnx")
    assert code == 1 and one_line_error(err, "the reference model") and digest(files / "model.onnx") == before


def test_two_outputs_may_not_be_one_file(files, capsys):
    out = files / "out.onnx"
    code, _, err = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", out,
                       "--report", files / "." / "out.onnx", "-q")
    assert code == 1 and one_line_error(err, "name the same file") and not out.exists()


def test_external_data_may_not_escape_the_model_folder(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    onnx.save(mobilenet_block_model(), tmp_path / "models" / "m.onnx", save_as_external_data=True,
              location="w.bin", size_threshold=0)
    proto = onnx.load(tmp_path / "models" / "m.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(proto, tmp_path / "models" / "escape.onnx")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    code, _, err = cli(capsys, "inspect", tmp_path / "models" / "escape.onnx")
    assert code == 1 and one_line_error(err, "outside")


# --- outputs checked before any work ---------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("output_is_folder", "is a folder"),
    ("parent_is_file", "is not a folder"),
    ("missing_parent", "does not exist"),
    ("report_missing_parent", "does not exist"),
])
def test_unwritable_outputs_fail_before_any_work(files, capsys, case, message):
    out, report = files / "out.onnx", files / "r.json"
    if case == "output_is_folder":
        out = files / "dir.onnx"
        out.mkdir()
    elif case == "parent_is_file":
        out = files / "calib.npz" / "out.onnx"
    elif case == "missing_parent":
        out = files / "nowhere" / "out.onnx"
    elif case == "report_missing_parent":
        report = files / "nowhere" / "r.json"
    start = time.perf_counter()
    code, _, err = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", out,
                       "--report", report, "-q")
    assert code == 1 and one_line_error(err, message)
    # before the check moved up front, the model was quantized and written, then the report failed
    assert not (files / "out.onnx").exists() and temp_files(files) == []
    assert time.perf_counter() - start < 5


def _without_root_file_powers():
    """As root, permissions do not bind: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    capability bounding set before exec, so the child is held to the folder's mode like a user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_output_folder(files):
    (files / "ro").mkdir()
    os.chmod(files / "ro", 0o555)
    preexec = _without_root_file_powers if os.geteuid() == 0 else None
    try:
        result = run_cli("quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", files / "ro" / "q.onnx",
                         "-q", preexec_fn=preexec)
    except subprocess.SubprocessError:
        pytest.skip("running as root without the capability to drop root's file permissions")
    assert result.returncode == 1 and one_line_error(result.stderr, "cannot be written", "Permission denied")
    assert list((files / "ro").iterdir()) == []


def test_full_disk_at_save_time_leaves_nothing(files):
    """A file-size limit makes the write fail like a full disk: one line, no output, no temp file."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = run_cli("quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
                     "--no-verify", "-q", preexec_fn=limit_file_size)
    assert result.returncode == 1 and one_line_error(result.stderr, "cannot write", "nothing was written")
    assert not (files / "q.onnx").exists() and temp_files(files) == []


# --- user problems are user errors, not internal errors --------------------------------------------

def _model_with(files, edit) -> Path:
    proto = mobilenet_block_model()
    edit(proto)
    path = files / "edited.onnx"
    onnx.save(proto, path)
    return path


def _metadata(key, value):
    def edit(proto):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.ClearField("opset_import"), "opset_import"),
    (lambda p: p.graph.ClearField("output"), "no outputs"),
    (lambda p: p.graph.node[1].input.__setitem__(0, "ghost"), "'ghost'"),
    (_metadata("onnxq.passes", "{not json"), "onnxq.passes"),
    (_metadata("onnxq.passes", '[{"name": 3}]'), "onnxq.passes"),
    (_metadata("onnxq.fidelity", "[1, 2]"), "onnxq.fidelity"),
])
@pytest.mark.parametrize("command", ["inspect", "lint", "quantize"])
def test_malformed_models_are_user_errors(files, capsys, edit, message, command):
    path = _model_with(files, edit)
    argv = [command, path] + (["--calib", files / "calib.npz", "-o", files / "q.onnx", "-q"]
                              if command == "quantize" else [])
    code, _, err = cli(capsys, *argv)
    assert code == 1 and one_line_error(err, message) and "Traceback" not in err


def test_bad_option_values_are_one_line_usage_errors(files, capsys):
    for option, value in (("--batch-size", 0), ("--max-samples", -3), ("--batch-size", "x")):
        with pytest.raises(SystemExit) as stop:
            main(["quantize", str(files / "model.onnx"), "--calib", str(files / "calib.npz"), "-o",
                  str(files / "q.onnx"), option, str(value)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and one_line_error(err, option)


def model_with_one_weight(value: float) -> onnx.ModelProto:
    """The test CNN with one classifier weight set to `value` (NaN, Inf)."""
    model = mobilenet_block_model()
    w = next(t for t in model.graph.initializer if t.name == "fc.weight")
    array = numpy_helper.to_array(w).copy()
    array[0, 0] = value
    w.CopyFrom(numpy_helper.from_array(array, w.name))
    return model


def test_nan_weights_are_refused(files, capsys):
    """Found by the fuzz suite: NaN weights were cast to arbitrary integers and the run succeeded."""
    onnx.save(model_with_one_weight(np.nan), files / "nan.onnx")
    code, _, err = cli(capsys, "quantize", files / "nan.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
                       "-q")
    assert code == 1 and one_line_error(err, "NaN or infinite") and not (files / "q.onnx").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda p: setattr(p.graph.initializer[0], "raw_data", p.graph.initializer[0].raw_data[:-3]), "is corrupt"),
    (lambda p: p.graph.input[0].type.tensor_type.__setattr__("elem_type", 0), "unknown element type"),
])
def test_corrupt_tensors_and_types_found_by_fuzzing(files, capsys, edit, message):
    path = _model_with(files, edit)
    code, _, err = cli(capsys, "quantize", path, "--calib", files / "calib.npz", "-o", files / "q.onnx", "-q")
    assert code == 1 and one_line_error(err, message)


def test_recipes_cannot_execute_code(files, capsys):
    (files / "recipe.yaml").write_text("passes:\n  - !!python/object/apply:os.system ['touch PWNED']\n")
    code, _, err = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o",
                       files / "q.onnx", "--recipe", files / "recipe.yaml", "-q")
    assert code == 1 and one_line_error(err, "cannot read recipe")
    assert not Path("PWNED").exists() and not (files / "PWNED").exists()


def test_non_utf8_recipe(files, capsys):
    (files / "recipe.yaml").write_bytes(b"passes:\n  - quantize # \xff\xfe\n")
    code, _, err = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o",
                       files / "q.onnx", "--recipe", files / "recipe.yaml", "-q")
    assert code == 1 and one_line_error(err, "not UTF-8")


def embedding_model(vocab: int = 10) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(vocab, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["out"], name="proj")], "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5, 4])], [table, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_data_the_model_cannot_run_on_is_a_user_error(tmp_path, capsys):
    onnx.save(embedding_model(vocab=10), tmp_path / "m.onnx")
    np.savez(tmp_path / "ids.npz", ids=np.full((4, 5), 100, np.int64))  # token 100 of a 10-token table
    result = run_cli("quantize", tmp_path / "m.onnx", "--calib", tmp_path / "ids.npz", "-o", tmp_path / "q.onnx", "-q")
    # a subprocess, so ONNX Runtime's own logging to the process's stderr would show too
    assert result.returncode == 1 and one_line_error(result.stderr, "cannot run", "m.onnx", "idx=100")
    assert not (tmp_path / "q.onnx").exists()
    code, _, err = cli(capsys, "compare", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "ids.npz")
    assert code == 1 and one_line_error(err, "cannot run the reference model", "idx=100")


def test_compare_with_a_model_that_overflows(files, capsys):
    """Found by the fuzz suite: an infinite weight made the SQNR's log10 fail (an internal error)."""
    onnx.save(model_with_one_weight(np.inf), files / "inf.onnx")
    code, _, err = cli(capsys, "compare", files / "model.onnx", files / "inf.onnx", "--data", files / "calib.npz",
                       "--json", files / "c.json")
    assert code == 0, err
    row = json.loads((files / "c.json").read_text())["outputs"][0]
    assert row["sqnr_db"] in ("-inf", "nan")  # standard JSON: non-finite numbers as strings


@pytest.mark.parametrize("change, message", [("rename", "different inputs"), ("reshape", "differs between")])
def test_compare_models_with_other_inputs(files, capsys, change, message):
    other = mobilenet_block_model()
    if change == "rename":
        other.graph.input[0].name = "image"
        for node in other.graph.node:
            node.input[:] = ["image" if i == "input" else i for i in node.input]
    else:
        other.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    onnx.save(other, files / "other.onnx")
    code, _, err = cli(capsys, "compare", files / "model.onnx", files / "other.onnx", "--data", files / "calib.npz")
    assert code == 1 and one_line_error(err, message)


# --- valid models that were refused ----------------------------------------------------------------

def ir3_model() -> onnx.ModelProto:
    """An opset-9, IR-version-3 CNN: every initializer also listed as a graph input, as IR 3 demands."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 1, 1)), ("wf", (10, 8)), ("bf", (10,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                    ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def _outputs(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_ir_version_3_model_quantizes(files, capsys):
    onnx.save(ir3_model(), files / "ir3.onnx")
    code, _, err = cli(capsys, "quantize", files / "ir3.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
                       "-q")
    assert code == 0, err
    result = onnx.load(files / "q.onnx")
    onnx.checker.check_model(result, full_check=True)
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in result.graph.initializer}
               for n in result.graph.node) == 3  # the weights are constants, so quantized
    feed = {"input": random_images(4, seed=3)}
    ref, got = _outputs(files / "ir3.onnx", feed), _outputs(files / "q.onnx", feed)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def fp16_model() -> onnx.ModelProto:
    """The test CNN with every float tensor, constant and attribute in FP16."""
    model = mobilenet_block_model()
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fp16_model_quantizes(files, capsys, target="tensorrt"):
    """Scales take the activation's float type (QuantizeLinear-19 needs x and y_scale alike); the
    result keeps FP16 inputs and outputs and stays close to the FP16 model."""
    onnx.save(fp16_model(), files / "fp16.onnx")
    np.savez(files / "calib16.npz", input=random_images(16, seed=1).astype(np.float16))
    code, _, err = cli(capsys, "quantize", files / "fp16.onnx", "--calib", files / "calib16.npz",
                       "-o", files / "q.onnx", "--target", target, "-q")
    assert code == 0, err
    feed = {"input": random_images(8, seed=4).astype(np.float16)}
    ref, got = _outputs(files / "fp16.onnx", feed), _outputs(files / "q.onnx", feed)
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    scales = [i for i in onnx.load(files / "q.onnx").graph.initializer if i.name.endswith("_scale")]
    assert scales and all(i.data_type == TensorProto.FLOAT16 for i in scales)


def test_fp16_model_for_ort_cpu_is_refused_not_silently_wrong(files, capsys):
    onnx.save(fp16_model(), files / "fp16.onnx")
    np.savez(files / "calib16.npz", input=random_images(16, seed=1).astype(np.float16))
    code, _, err = cli(capsys, "quantize", files / "fp16.onnx", "--calib", files / "calib16.npz",
                       "-o", files / "q.onnx", "--target", "ort-cpu", "-q")
    assert code == 1 and "tensorrt only" in err and len(err.strip().splitlines()) == 1
    assert not (files / "q.onnx").exists()


def test_minus_one_batch_dimension(files, capsys):
    """PaddlePaddle writes -1 for a free dimension: quantize and compare treat it as symbolic."""
    model = mobilenet_block_model()
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = -1
    onnx.save(model, files / "paddle.onnx")
    code, _, err = cli(capsys, "quantize", files / "paddle.onnx", "--calib", files / "calib.npz",
                       "-o", files / "q.onnx", "--batch-size", 2, "-q")
    assert code == 0, err
    code, text, err = cli(capsys, "compare", files / "paddle.onnx", files / "q.onnx", "--data", files / "calib.npz")
    assert code == 0 and "8 samples" in text, err
    code, text, _ = cli(capsys, "inspect", files / "paddle.onnx")
    assert code == 0 and "-0.000" not in text and " 0.000 GFLOPs" not in text


def test_inspect_flops_never_negative(files, capsys):
    from onnxq.analysis.inspection import inspect_model
    from onnxq.ir.modelio import load_model

    model = mobilenet_block_model()
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    symbolic = inspect_model(load_model(model)).total_gflops
    assert symbolic == inspect_model(load_model(mobilenet_block_model(batch=1))).total_gflops > 0


# --- process and file hygiene ----------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_processes_are_removed(files, capsys):
    stale = files / f".q.onnx.onnxq-{_dead_pid()}-0badcafe.tmp"
    stale_data = files / f".q.onnx.onnxq-{_dead_pid()}-0badcafe.tmp.data"
    live = files / f".q.onnx.onnxq-{os.getppid()}-12345678.tmp"  # a writer that is still running
    other = files / ".q.onnx.abc.tmp"                              # not onnxq's naming: not ours to delete
    for path in (stale, stale_data, live, other):
        path.write_bytes(b"partial")
    code, _, _ = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
                     "-q")
    assert code == 0 and not stale.exists() and not stale_data.exists() and live.exists() and other.exists()


def test_json_reports_use_unique_temporary_names(tmp_path):
    target = tmp_path / "report.json"
    other_writer = tmp_path / "report.json.tmp"  # the fixed name two processes used to share
    other_writer.write_text("someone else's half-written report")
    write_text(target, '{"ok": true}')
    assert json.loads(target.read_text()) == {"ok": True}
    assert other_writer.read_text() == "someone else's half-written report"
    assert temp_files(tmp_path) == ["report.json.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(files, capsys, umask):
    old = os.umask(umask)
    try:
        code, _, _ = cli(capsys, "quantize", files / "model.onnx", "--calib", files / "calib.npz",
                         "-o", files / "q.onnx", "--report", files / "r.json", "-q")
    finally:
        os.umask(old)
    assert code == 0
    for path in (files / "q.onnx", files / "r.json"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see the handler")
def test_sigterm_cleans_up_like_ctrl_c(files):
    onnx.save(mobilenet_block_model(channels=32), files / "big.onnx")
    np.savez(files / "calib.npz", input=random_images(1024, seed=1))
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", str(files / "big.onnx"), "--calib",
                             str(files / "calib.npz"), "-o", str(files / "q.onnx"), "--calibrator", "entropy"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not _catches_sigterm(proc.pid):  # onnxq's handler is in place: work begins
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "onnxq: terminated; no partial file left"
    assert not (files / "q.onnx").exists() and temp_files(files) == []


def test_printed_names_are_sanitised(files, capsys):
    model = mobilenet_block_model()
    model.graph.node[0].name = "stem\x1b[2J\x1b]0;pwned\x07"
    entry = model.metadata_props.add()
    entry.key, entry.value = "onnxq.passes", json.dumps([{"name": "evil\x1b[31m", "kind": "exact\r",
                                                          "options": {}, "summary": {"x": "\x1b[1m"}, "seconds": 0}])
    onnx.save(model, files / "evil.onnx")
    code, text, err = cli(capsys, "inspect", files / "evil.onnx")
    assert code == 0 and "evil\\x1b[31m" in text
    assert not any(c in text + err for c in "\x1b\x07\r")


# --- Python API --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    ({"model": 123}, OnnxqTypeError, "model"),
    ({"batch_size": "x"}, OnnxqTypeError, "batch_size"),
    ({"batch_size": 0}, OnnxqValueError, "batch_size"),
    ({"max_samples": -1}, OnnxqValueError, "max_samples"),
    ({"recipe": []}, OnnxqValueError, "recipe"),
    ({"recipe": 5}, OnnxqTypeError, "recipe"),
    ({"target": 5}, OnnxqTypeError, "target"),
    ({"target": "gpu"}, OnnxqValueError, "target"),
    ({"calibrator": "best"}, OnnxqValueError, "calibrator"),
    ({"per_tensor": "yes"}, OnnxqTypeError, "per_tensor"),
    ({"calibration_data": None}, OnnxqTypeError, "calibration_data"),
    ({"output": 7}, OnnxqTypeError, "output"),
    ({"output": "q.txt"}, OnnxqValueError, "output"),
    ({"log": "print"}, OnnxqTypeError, "log"),
])
def test_api_arguments_are_checked_at_the_boundary(files, kwargs, error, name):
    args = {"model": str(files / "model.onnx"), "calibration_data": str(files / "calib.npz"), **kwargs}
    with pytest.raises(error) as caught:
        onnxq.quantize(args.pop("model"), args.pop("calibration_data"), show_progress=False,
                       **{"log": lambda *_: None, **args})
    assert isinstance(caught.value, OnnxqError) and str(caught.value).startswith(f"{name}:")
    assert isinstance(caught.value, TypeError if error is OnnxqTypeError else ValueError)


def test_api_refuses_output_over_its_input(files):
    with pytest.raises(OnnxqError, match="is the input model"):
        onnxq.quantize(str(files / "model.onnx"), str(files / "calib.npz"), output=str(files / "model.onnx"),
                       show_progress=False, log=lambda *_: None)


# --- exit status ---------------------------------------------------------------------------------------

def test_written_but_lint_failed_has_its_own_status(files):
    """A recipe that keeps the classifier Gemm in float breaks TensorRT rule R8: the model is written,
    and the run says so on stderr and exits 4 (even with -q)."""
    (files / "recipe.yaml").write_text("passes:\n  - quantize: {exclude: [fc/Gemm]}\n")
    result = run_cli("quantize", files / "model.onnx", "--calib", files / "calib.npz", "-o", files / "q.onnx",
                     "--recipe", files / "recipe.yaml", "-q")
    assert result.returncode == EXIT_LINT_FAILED == 4 and (files / "q.onnx").exists()
    assert result.stdout == "" and result.stderr.startswith("onnxq: lint failed:") and "R8" in result.stderr
    assert result.stderr.count("\n") == 1
