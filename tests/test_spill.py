"""Float weights kept on disk during a large model's run (onnxq.ir.spill): read back unchanged, nothing
held between reads, the same quantized model as a run in memory, and no trace left after the run."""

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION
from onnxq.api import quantize
from onnxq.errors import OnnxqError
from onnxq.ir.graph import replace_initializer
from onnxq.ir.modelio import load_model
from onnxq.ir.spill import FOLDER_PREFIX, OnDemandTensor, WeightSpill, spilling
from onnxq.pipeline import run as pipeline_run
from onnxq.pipeline.passes import GraphPass, Kind, PassContext
from onnxq.runtime import segments
from onnxq.runtime.session import exposing, session
from transformer_builders import export, feeds_for, tiny_llama


def two_weights(rng) -> onnx.ModelProto:
    """y = (x·A)·B with A float32 (1 MiB) and B float16 (small)."""
    inits = [numpy_helper.from_array(rng.normal(size=(512, 512)).astype(np.float32), "A"),
             numpy_helper.from_array(rng.normal(size=(512, 8)).astype(np.float16), "B")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Cast", ["h"], ["h16"], to=10),
             helper.make_node("MatMul", ["h16", "B"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def test_spilled_weights_read_back_unchanged_and_are_not_held(tmp_path):
    rng = np.random.default_rng(0)
    model = ir.from_proto(two_weights(rng))
    a, b = (model.graph.initializers[n].const_value.numpy().copy() for n in ("A", "B"))
    with WeightSpill(min_bytes=0) as spill:
        assert spill.absorb(model) == a.nbytes + b.nbytes
        assert spill.absorb(model) == 0  # already on disk
        tensor = model.graph.initializers["A"].const_value
        assert isinstance(tensor, OnDemandTensor) and tensor.scratch
        first = tensor.numpy()
        first[:] = 0  # a reader's copy is its own: the next read is unchanged
        np.testing.assert_array_equal(tensor.numpy(), a)
        np.testing.assert_array_equal(model.graph.initializers["B"].const_value.numpy(), b)
        assert model.graph.initializers["B"].const_value.numpy().dtype == np.float16
        x = rng.normal(size=(2, 512)).astype(np.float32)
        np.testing.assert_array_equal(session(model).run(None, {"x": x})[0],
                                      session(ir.from_proto(two_weights(np.random.default_rng(0)))).run(None, {"x": x})[0])
        spill.restore(model)
        restored = model.graph.initializers["A"].const_value
        assert type(restored) is ir.Tensor
        np.testing.assert_array_equal(restored.numpy(), a)
        folder = spill.folder
    assert not folder.exists()


def test_a_weight_written_while_spilling_goes_to_disk_at_once_and_its_predecessor_leaves_it():
    model = ir.from_proto(two_weights(np.random.default_rng(3)))
    value = model.graph.initializers["A"]
    with WeightSpill(min_bytes=0) as spill, spilling(spill):
        spill.absorb(model)
        assert len(list(spill.folder.iterdir())) == 2
        first = Path(value.const_value.path)
        replace_initializer(value, np.full((512, 512), 3.0, np.float32))  # what a rewriting pass does
        assert isinstance(value.const_value, OnDemandTensor) and value.const_value.scratch
        assert not first.exists() and len(list(spill.folder.iterdir())) == 2
        np.testing.assert_array_equal(value.const_value.numpy(), 3.0)
        with spilling(None):  # a nested run of a small model keeps its weights in memory
            replace_initializer(value, np.ones((512, 512), np.float32))
            assert type(value.const_value) is ir.Tensor
    replace_initializer(value, np.zeros((512, 512), np.float32))  # outside a spilling run: in memory
    assert type(value.const_value) is ir.Tensor


def test_a_disk_that_cannot_take_a_weight_leaves_it_in_memory_with_a_warning(caplog):
    model = ir.from_proto(two_weights(np.random.default_rng(4)))
    a = model.graph.initializers["A"].const_value.numpy().copy()
    with WeightSpill(min_bytes=0) as spill:
        folder, spill.folder = spill.folder, spill.folder / "gone"  # writes there fail as on a full disk
        with caplog.at_level(logging.WARNING, logger="onnxq"):
            assert spill.absorb(model) == 0
        spill.folder = folder
        assert spill.failed and "holding them in memory" in caplog.text
        assert not isinstance(model.graph.initializers["A"].const_value, ir.ExternalTensor)
        np.testing.assert_array_equal(model.graph.initializers["A"].const_value.numpy(), a)


def test_folders_of_dead_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = tmp_path / f"{FOLDER_PREFIX}{int(finished.stdout)}-abc"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "1.bin").write_bytes(b"0" * 16)
    with WeightSpill(min_bytes=0) as spill:
        assert spill.folder.parent == tmp_path
        assert not dead.exists() and live.exists()


def test_weights_of_the_models_own_file_are_read_where_they_are(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "m.onnx"
    onnx.save_model(two_weights(rng), str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = load_model(path)
    a = np.array(model.graph.initializers["A"].const_value.numpy())
    with WeightSpill(min_bytes=0) as spill:
        assert spill.absorb(model) == 0  # nothing copied
        tensor = model.graph.initializers["A"].const_value
        assert isinstance(tensor, OnDemandTensor) and not tensor.scratch
        np.testing.assert_array_equal(tensor.numpy(), a)
        spill.restore(model)
    restored = model.graph.initializers["A"].const_value
    assert type(restored) is ir.ExternalTensor and Path(restored.path) == tmp_path / "m.onnx.data"
    np.testing.assert_array_equal(restored.numpy(), a)


def test_a_weight_asked_for_as_an_output_comes_back_unchanged(tmp_path):
    """A weight of the model's external file, handed to ORT as an external initializer, can be asked for
    as an output (statistics of constant inputs) and comes back as it is."""
    rng = np.random.default_rng(5)
    path = tmp_path / "m.onnx"
    onnx.save_model(two_weights(rng), str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = load_model(path)
    a = np.array(model.graph.initializers["A"].const_value.numpy())
    x = rng.normal(size=(2, 512)).astype(np.float32)
    got = session(exposing(model, ["A"])).run(["A"], {"x": x})[0]
    np.testing.assert_array_equal(got, a)


@pytest.fixture
def spill_everything(monkeypatch, tmp_path):
    """Every model counts as large: every float weight goes to disk between passes."""
    monkeypatch.setattr(pipeline_run, "SPILL_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(pipeline_run, "SPILL_TENSOR_BYTES", 0)
    spills = []

    class Recorded(WeightSpill):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spills.append(self)

    monkeypatch.setattr(pipeline_run, "WeightSpill", Recorded)
    return spills


def test_a_recipe_run_with_weights_on_disk_gives_the_same_model(tmp_path, monkeypatch, spill_everything):
    """transformer-w8a8 on a tiny LLaMA, run in segments as a large model is: every pass reads its weights
    back from the scratch file; the quantized weights and outputs are those of a run in memory."""
    path = export(tiny_llama(layers=3), tmp_path / "llama.onnx", "llama")
    calib, probe = feeds_for("llama", 16, seed=1, seq=32), feeds_for("llama", 2, seed=5, seq=32)
    monkeypatch.setattr(segments, "SEGMENT_THRESHOLD_BYTES", 0)

    def quantized(output):
        quantize(path, calib, output=output, recipe="transformer-w8a8", show_progress=False, log=lambda *_: None)
        return onnx.load(str(output))

    spilled = quantized(tmp_path / "spilled.onnx")
    assert len(spill_everything) == 1 and spill_everything[0].spilled_bytes > 0
    assert not spill_everything[0].folder.exists()
    monkeypatch.setattr(pipeline_run, "SPILL_THRESHOLD_BYTES", 1 << 40)
    in_memory = quantized(tmp_path / "in_memory.onnx")
    assert len(spill_everything) == 1
    assert not (tmp_path / "spilled.onnx.data").exists()  # an inline model leaves inline
    weights = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert {t.name for t in spilled.graph.initializer} == weights.keys()
    for t in spilled.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), weights[t.name], err_msg=t.name)
    np.testing.assert_array_equal(session(spilled).run(None, probe)[0], session(in_memory).run(None, probe)[0])


class Failing(GraphPass):
    name = "failing"
    kind = Kind.EXACT

    def apply(self, model, ctx):
        raise OnnxqError("this pass fails")


def test_the_scratch_folder_goes_and_the_model_stays_whole_when_a_pass_fails(spill_everything):
    model = ir.from_proto(two_weights(np.random.default_rng(2)))
    a = model.graph.initializers["A"].const_value.numpy().copy()
    with pytest.raises(OnnxqError, match="this pass fails"):
        pipeline_run.run_pipeline(model, [Failing()], PassContext(calibration=None, show_progress=False))
    assert len(spill_everything) == 1 and not spill_everything[0].folder.exists()
    np.testing.assert_array_equal(model.graph.initializers["A"].const_value.numpy(), a)  # still readable
