"""Property-based fuzzing of the command line's contract (docs/guarantees.md).

Valid small inputs (a CNN from builders, its calibration data, a recipe) are mutated: bytes truncated
or flipped, protos edited (dtypes, shapes, ranks, names, opsets, metadata, NaN/Inf weights), arrays
of the wrong dtype, shape or rank, NaN/Inf, zero or huge sizes, recipes broken, option values out of
range, and output paths that point at inputs, folders or nowhere. Whatever happens, the run must
either succeed (0, or 4 when its output fails lint) or stop with exactly one `onnxq: error:` line
(status 1; 2 for a malformed command line); never a traceback or an internal error, never a changed
input file, never a temporary file left behind, and after a failure no output file.

The CI run is seeded and bounded; `-m slow` runs the same properties with many more examples.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from builders import mobilenet_block_model, random_images
from conftest import digest, temp_files
from onnxq.cli.main import main

CI = settings(max_examples=100, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(CI, max_examples=600)

SAMPLES, SIZE = 4, 16


def _base_model() -> onnx.ModelProto:
    return mobilenet_block_model(channels=4)


def _base_calib() -> np.ndarray:
    return random_images(SAMPLES, size=SIZE, seed=1)


# --- mutations --------------------------------------------------------------------------------------

def _mutate_bytes(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "zero", "keep"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            out[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "zero":
        return b""
    return data


def _set_dims(value_info, dims):
    shape = value_info.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        entry = shape.dim.add()
        if isinstance(d, str):
            entry.dim_param = d
        else:
            entry.dim_value = d


MODEL_EDITS = ["none", "input_dtype", "input_dims", "input_rank", "drop_output", "rename_input", "opset",
               "drop_initializer", "nan_weights", "huge_dims", "metadata", "ir_version", "node_op", "empty_graph",
               "duplicate_output", "attribute"]


def _mutate_model(model: onnx.ModelProto, draw) -> onnx.ModelProto:
    edit = draw(st.sampled_from(MODEL_EDITS[1:]))
    graph = model.graph
    if edit == "input_dtype":
        graph.input[0].type.tensor_type.elem_type = draw(st.sampled_from(
            [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.UINT8, TensorProto.BOOL,
             TensorProto.STRING, 0, 99]))
    elif edit == "input_dims":
        _set_dims(graph.input[0], draw(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from(["N", "", "?"])),
                                                min_size=4, max_size=4)))
    elif edit == "input_rank":
        _set_dims(graph.input[0], draw(st.lists(st.integers(0, 16), max_size=6)))
    elif edit == "drop_output":
        graph.ClearField("output")
    elif edit == "rename_input":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        if node.input:
            node.input[0] = draw(st.sampled_from(["", "ghost", "input", node.output[0]]))
    elif edit == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 6, 9, 10, 11, 12, 21, 22, 23, 99, 10**6]))
    elif edit == "drop_initializer":
        del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    elif edit == "nan_weights":
        index = draw(st.integers(0, len(graph.initializer) - 1))
        array = numpy_helper.to_array(graph.initializer[index]).copy()
        if array.dtype.kind == "f" and array.size:
            array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, graph.initializer[index].name))
    elif edit == "huge_dims":
        shaped = [init for init in graph.initializer if init.dims]
        init = shaped[draw(st.integers(0, len(shaped) - 1))]
        init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(st.sampled_from([0, 2**31, 2**40, 10**9]))
    elif edit == "metadata":
        entry = model.metadata_props.add()
        entry.key = draw(st.sampled_from(["onnxq.passes", "onnxq.fidelity", "onnxq.recipe", "other"]))
        entry.value = draw(st.sampled_from(["", "[", "{}", "[1]", "[{}]", "null", '[{"name": "x"}]',
                                            "\x1b[2J\x07", '[{"replacement": 3}]']))
    elif edit == "ir_version":
        model.ir_version = draw(st.sampled_from([0, 1, 2, 3, 99]))
    elif edit == "node_op":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        node.op_type = draw(st.sampled_from(["Foo", "", "Conv", "Relu", "Softmax", "Loop"]))
    elif edit == "empty_graph":
        graph.ClearField("node")
    elif edit == "duplicate_output":
        graph.node[-1].output[0] = graph.node[0].output[0]
    elif edit == "attribute":
        node = next(n for n in graph.node if n.op_type == "Conv")
        for attribute in node.attribute:
            if attribute.ints:
                attribute.ints[0] = draw(st.sampled_from([-1, 0, 100]))
    return model


CALIB_EDITS = ["none", "dtype", "shape", "rank", "nan", "empty", "extra_key", "missing_key", "npy", "objects",
               "bytes", "huge_count", "scalar", "folder"]


def _write_calib(folder: Path, draw, mutate: bool) -> Path:
    edit = draw(st.sampled_from(CALIB_EDITS[1:])) if mutate else "none"
    x = _base_calib()
    path = folder / "calib.npz"
    arrays = {"input": x}
    if edit == "dtype":
        arrays["input"] = x.astype(draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.bool_])))
    elif edit == "shape":
        arrays["input"] = np.zeros(draw(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 20),
                                                  st.integers(0, 20))), np.float32)
    elif edit == "rank":
        arrays["input"] = np.zeros(draw(st.lists(st.integers(0, 3), max_size=6)), np.float32)
    elif edit == "nan":
        x = x.copy()
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays["input"] = x
    elif edit == "empty":
        arrays["input"] = x[:0]
    elif edit == "extra_key":
        arrays["mask"] = np.ones((SAMPLES, 3), np.int64)
    elif edit == "missing_key":
        arrays = {"image": x}
    elif edit == "npy":
        path = folder / "calib.npy"
        np.save(path, x)
        return path
    elif edit == "objects":
        arrays["input"] = np.array([{"a": 1}] * SAMPLES, dtype=object)
    elif edit == "huge_count":
        arrays["input"] = np.broadcast_to(x[:1], (draw(st.integers(5, 64)), *x.shape[1:])).copy()
    elif edit == "scalar":
        arrays["input"] = np.float32(1.0)
    elif edit == "folder":
        path = folder / "calib_dir"
        path.mkdir()
        for i in range(draw(st.integers(0, 3))):
            np.savez(path / f"part{i}.npz", input=x[i:i + 1] if draw(st.booleans()) else x.astype(np.float64))
        return path
    np.savez(path, **arrays)  # object arrays are pickled inside: onnxq must refuse to unpickle them
    if edit == "bytes":
        path.write_bytes(_mutate_bytes(path.read_bytes(), draw))
    return path


RECIPES = [
    b"passes:\n  - quantize\n",
    b"passes:\n  - fold_batchnorm\n  - quantize: {calibrator: max}\n",
    b"passes: []\n",
    b"passes:\n  - no_such_pass\n",
    b"passes:\n  - quantize: [1, 2]\n",
    b"[]\n",
    b"- quantize\n",
    b"passes: {quantize: 1}\n",
    b"passes:\n  - {include: default}\n",
    b"passes:\n  - {include: recipe}\n",
    b"passes:\n  - quantize\n  \t- bad indent: [\n",
    b"\xff\xfe\x00p\x00a\x00",
    b"!!python/object/apply:os.system ['echo pwned']\n",
    b"passes:\n  - !!python/object/apply:os.system ['echo pwned']\n",
    b"&a [*a]\n",
    b"",
]


def _write_recipe(folder: Path, draw, mutate: bool) -> Path | None:
    choice = draw(st.sampled_from([None, *range(len(RECIPES))])) if mutate else draw(st.sampled_from([None, 0, 1]))
    if choice is None:
        return None
    path = folder / "recipe.yaml"
    data = RECIPES[choice]
    path.write_bytes(_mutate_bytes(data, draw) if mutate and data and draw(st.booleans()) else data)
    return path


OUTPUT_CASES = ["fresh", "fresh", "fresh", "model", "calib", "recipe", "folder", "missing_folder", "under_file",
                "symlink_to_model", "hardlink_to_model", "dotdot_model", "no_suffix", "same_as_report"]


def _output_paths(folder: Path, model: Path, calib: Path, recipe: Path | None, draw,
                  mutate: bool) -> tuple[Path, Path | None]:
    case = draw(st.sampled_from(OUTPUT_CASES[3:])) if mutate else "fresh"
    out, report = folder / "out.onnx", (folder / "report.json" if draw(st.booleans()) else None)
    if case == "model":
        out = model
    elif case == "calib":
        report = calib
    elif case == "recipe" and recipe is not None:
        report = recipe
    elif case == "folder":
        out = folder / "outdir.onnx"
        out.mkdir()
    elif case == "missing_folder":
        out = folder / "missing" / "out.onnx"
    elif case == "under_file":
        out = model / "out.onnx"
    elif case == "symlink_to_model":
        out.symlink_to(model)
    elif case == "hardlink_to_model":
        os.link(model, out)
    elif case == "dotdot_model":
        (folder / "sub").mkdir()
        out = folder / "sub" / ".." / model.name
    elif case == "no_suffix":
        out = folder / "out.txt"
    elif case == "same_as_report":
        report = out
    return out, report


OPTIONS = st.lists(st.sampled_from([
    ["--batch-size", "0"], ["--batch-size", "3"], ["--batch-size", "-1"], ["--batch-size", "x"],
    ["--max-samples", "0"], ["--max-samples", "2"], ["--max-samples", "-5"], ["--max-samples", "99999999999"],
    ["--target", "ort-cpu"], ["--per-tensor"], ["--calibrator", "max"], ["--calibrator", "mse"],
    ["--padding-mask", "input"], ["--padding-mask", "nope"], ["--allow-unknown-ops"], ["--no-verify"],
    ["--rounding", "nearest"],
]), max_size=3)


# --- the contract -----------------------------------------------------------------------------------



def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse: a malformed command line
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def _check_contract(code: int, err: str, inputs: dict[Path, str | None], folder: Path, outputs: list[Path],
                    existed: set[Path], argv: list[str]) -> None:
    where = f"onnxq {' '.join(argv)}\nstatus {code}, stderr:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, where
    assert code in (0, 1, 2, 4), where
    if code in (1, 2):
        assert err.startswith("onnxq: error: ") and err.count("\n") == 1, where
        for path in outputs:  # no partial output after a failure
            assert path in existed or not path.is_file(), where
    if code == 4:  # lint prints its verdict on stdout; quantize says on stderr that its output fails lint
        assert argv[0] == "lint" or err.startswith("onnxq: lint failed:"), where
    for path, before in inputs.items():
        assert digest(path) == before, f"{path} changed: {where}"
    assert temp_files(folder) == [], where


TARGETS = ["nothing", "model", "model_bytes", "calibration", "recipe", "options", "outputs"]


def _fuzz_once(data, command: str) -> None:
    """One run with one of its inputs mutated (or none: the valid run must succeed too)."""
    target = data.draw(st.sampled_from(TARGETS), label="mutated")
    with tempfile.TemporaryDirectory(prefix="onnxq-fuzz-") as tmp:
        folder = Path(tmp)
        model_path = folder / "model.onnx"
        proto = _base_model()
        if target == "model":
            proto = _mutate_model(proto, data.draw)
        model_bytes = proto.SerializeToString()
        if target == "model_bytes":
            model_bytes = _mutate_bytes(model_bytes, data.draw)
        model_path.write_bytes(model_bytes)
        calib = _write_calib(folder, data.draw, target == "calibration")
        recipe = _write_recipe(folder, data.draw, target == "recipe") if command == "quantize" else None
        out, report = _output_paths(folder, model_path, calib, recipe, data.draw, target == "outputs")
        if command == "quantize":
            argv = ["quantize", str(model_path), "--calib", str(calib), "-o", str(out), "-q",
                    *(["--report", str(report)] if report else []), *(["--recipe", str(recipe)] if recipe else [])]
            if target == "options":
                argv += [word for option in data.draw(OPTIONS) for word in option]
            outputs = [out] + ([report] if report else [])
        elif command == "compare":
            reference = folder / "reference.onnx"
            onnx.save(_base_model(), reference)
            argv = ["compare", str(reference), str(model_path), "--data", str(calib),
                    *(["--json", str(report)] if report else [])]
            outputs = [report] if report else []
        else:
            argv = [command, str(model_path), *(["--json", str(report)] if report else [])]
            outputs = [report] if report else []
        watched = [model_path] + ([calib] if command in ("quantize", "compare") else []) + ([recipe] if recipe else [])
        inputs = {p: digest(p) for p in watched}
        existed = {p for p in outputs if p.exists()}
        code, _, err = _run(argv)
        event(f"{command}, {target} mutated: exit {code}")
        _check_contract(code, err, inputs, folder, outputs, existed, argv)
        if target == "nothing":
            assert code in (0, 4) if command in ("quantize", "lint") else code == 0, (argv, err)


COMMANDS = st.sampled_from(["quantize", "quantize", "quantize", "inspect", "lint", "compare"])


@CI
@given(data=st.data(), command=COMMANDS)
def test_cli_contract_holds_for_mutated_inputs(data, command):
    _fuzz_once(data, command)


@pytest.mark.slow
@LONG
@given(data=st.data(), command=COMMANDS)
def test_cli_contract_holds_for_mutated_inputs_long(data, command):
    _fuzz_once(data, command)
