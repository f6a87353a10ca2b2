"""Models with external data: loaded lazily, checked and run without serialising their weights, saved
with external data; the skeleton check answers as the full one; one model above protobuf's 2 GiB."""

import re
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, cli, run, temp_files
from onnxq.api import quantize
from onnxq.ir.checks import find_problem
from onnxq.ir.modelio import load_model, save_model
from onnxq.runtime.session import session


def two_matmuls(features: int, hidden: int, outputs: int, *, seed: int = 0, weights: bool = True) -> onnx.ModelProto:
    """x (n, features) · W1 (features, hidden) → Relu → · W2 (hidden, outputs)."""
    rng = np.random.default_rng(seed)
    inits = []
    if weights:
        inits = [numpy_helper.from_array((rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32), "w1"),
                 numpy_helper.from_array((rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)).astype(np.float32), "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", outputs])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_external_data_model_loads_lazily_quantizes_and_round_trips(tmp_path):
    float_model = two_matmuls(64, 1024, 16)  # W1 256 KiB, W2 64 KiB
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    reference = run(float_model, {"x": x})[0]
    source = tmp_path / "m.onnx"
    onnx.save(float_model, source, save_as_external_data=True, location="m.onnx.data", size_threshold=0)

    loaded = load_model(source)
    assert isinstance(loaded.graph.initializers["w1"].const_value, ir.ExternalTensor)
    assert np.array_equal(session(loaded).run(None, {"x": x})[0], reference)  # weights handed to ORT as arrays

    out = tmp_path / "q.onnx"
    proto = quantize(source, {"x": x}, output=out, show_progress=False)
    assert (tmp_path / "q.onnx.data").is_file()  # came with external data, leaves with it
    assert not temp_files(tmp_path)
    quantized = run(out, {"x": x})[0]
    assert np.array_equal(session(load_model(out)).run(None, {"x": x})[0], quantized)
    assert np.array_equal(run(proto, {"x": x})[0], quantized)
    assert np.abs(quantized - reference).max() / np.abs(reference).max() < 0.05
    assert_lint_clean(out)

    # asked for explicitly, an in-memory model is written with external data too, and stays usable
    inline = load_model(out)
    ir.external_data.load_to_model(inline)
    again = tmp_path / "again.onnx"
    save_model(inline, again, external_data=True)
    stored = onnx.load(again, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    assert np.array_equal(run(again, {"x": x})[0], quantized)
    assert np.array_equal(session(inline).run(None, {"x": x})[0], quantized)
    # and a lazily loaded model can be written with every weight inline
    flat = tmp_path / "flat.onnx"
    save_model(load_model(out), flat, external_data=False)
    assert not (tmp_path / "flat.onnx.data").exists()
    assert np.array_equal(run(onnx.load(flat), {"x": x})[0], quantized)


def test_external_data_of_the_wrong_length_is_refused(tmp_path, capsys):
    onnx.save(two_matmuls(64, 1024, 16), tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    with open(tmp_path / "m.onnx.data", "r+b") as data:
        data.truncate(1000)
    code, _, err = cli(capsys, "inspect", tmp_path / "m.onnx")
    assert code == 1 and "does not fit" in err and len(err.strip().splitlines()) == 1


def _broken(case: str) -> onnx.ModelProto:
    """A model with weights above the skeleton's 1 MiB limit and one defect."""
    model = two_matmuls(256, 2048, 16)  # W1 2 MiB
    graph = model.graph
    if case == "matmul_shapes":
        graph.input[0].type.tensor_type.shape.dim[1].dim_value = 255
    elif case == "weight_type":
        graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((256, 2048), np.int32), "w1"))
    elif case == "unknown_op":
        graph.node[1].op_type = "Relux"
    elif case == "relu_arity":
        graph.node[1].input.append("w2")
    elif case == "reshape_to_constant_shape":  # a small constant, read by shape inference, decides it
        graph.initializer.append(numpy_helper.from_array(np.array([7, -1], np.int64), "shape"))
        graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["z"], name="reshape"))
        graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 5]))
    return model


@pytest.mark.parametrize("case", ["matmul_shapes", "weight_type", "unknown_op", "relu_arity", "reshape_to_constant_shape"])
@pytest.mark.parametrize("strict", [True, False])
def test_skeleton_check_finds_what_the_full_check_finds(case, strict):
    proto = _broken(case)
    try:
        onnx.checker.check_model(proto, full_check=strict)
        full = None
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        full = str(exc).strip().splitlines()[0]
    assert find_problem(ir.from_proto(proto), strict=strict) == full
    if strict:
        assert full is not None  # every case is broken for the strict check


@pytest.mark.slow
def test_model_above_two_gib_quantizes(tmp_path):
    """x (n, 1024) · W1 (1024, 540·1024) → Relu → · W2 (540·1024, 16): 2.2 GB of FP32 weights."""
    hidden = 540 * 1024
    model = two_matmuls(1024, hidden, 16, weights=False)
    data = tmp_path / "big.onnx.data"
    rng = np.random.default_rng(0)
    with open(data, "wb") as out:  # written a block of rows at a time: never the whole weight in memory
        out.writelines((rng.standard_normal((64, hidden), dtype=np.float32) / 32).tobytes() for start in range(0, 1024, 64))
        w2_offset = out.tell()
        out.writelines((rng.standard_normal((65536, 16), dtype=np.float32) / np.sqrt(hidden)).astype(np.float32).tobytes() for start in range(0, hidden, 65536))
    for name, dims, offset in (("w1", (1024, hidden), 0), ("w2", (hidden, 16), w2_offset)):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(4 * dims[0] * dims[1]))):
            tensor.external_data.add(key=key, value=value)
        model.graph.initializer.append(tensor)
    onnx.save(model, tmp_path / "big.onnx")
    x = rng.standard_normal((16, 1024), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x)

    out = tmp_path / "q.onnx"
    timed = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "onnxq.cli.main", "quantize",
                            str(tmp_path / "big.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "-q"],
                           check=False, capture_output=True, text=True)
    assert timed.returncode == 0, timed.stderr[-3000:]
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", timed.stderr).group(1)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timed.stderr).group(1))
    print(f"\nquantize of a {data.stat().st_size / 2**30:.2f} GiB model: wall {wall}, peak RSS {peak / 2**20:.2f} GiB")
    assert (tmp_path / "q.onnx.data").is_file()

    quantized = load_model(out)
    largest = max(quantized.graph.initializers.values(), key=lambda v: v.const_value.nbytes)
    assert largest.const_value.dtype == ir.DataType.INT8 and isinstance(largest.const_value, ir.ExternalTensor)
    y = session(out).run(None, {"x": x})[0]
    assert np.array_equal(session(quantized).run(None, {"x": x})[0], y)
    reference = session(load_model(tmp_path / "big.onnx")).run(None, {"x": x})[0]
    assert np.abs(y - reference).max() / np.abs(reference).max() < 0.1
    assert_lint_clean(quantized)
