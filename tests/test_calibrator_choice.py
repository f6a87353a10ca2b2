"""calibrator: auto - each candidate's activation ranges tried on a copy, the nearest outputs kept."""

import json

import numpy as np
import onnx
import pytest

from builders import IR_VERSION
from conftest import run, sqnr_db
from onnxq import quantize
from onnxq.quant.calibrator_choice import AUTO_CANDIDATES


def _linear_model(w: np.ndarray) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
         onnx.helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")], "two_linears",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", w.shape[0]])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", w.shape[0]])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(w.T.copy(), "w2")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _quantize_record(model: onnx.ModelProto) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    return next(r for r in json.loads(meta["onnxq.passes"]) if r["name"] == "quantize")["summary"]


@pytest.fixture(scope="module")
def heavy_tailed():
    """Rare huge spikes on an input channel the model ignores (its weight row is zero): a range that
    covers them wastes the INT8 levels, clipping them costs nothing."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 32)).astype(np.float32) / 6
    w[0] = 0.0
    x = rng.normal(size=(256, 32)).astype(np.float32)
    x[rng.choice(256, 8, replace=False), 0] = 150.0
    return _linear_model(w), {"x": x}


def test_auto_keeps_the_calibrator_with_the_least_output_error(heavy_tailed):
    model, calib = heavy_tailed
    chosen = quantize(model, calib, recipe=[{"quantize": {"calibrator": "auto"}}], batch_size=32,
                      show_progress=False, log=lambda *_: None)
    summary = _quantize_record(chosen)
    errors = summary["calibrator_output_error"]
    assert set(errors) == set(AUTO_CANDIDATES)
    assert summary["calibrator_chosen"] == min(errors, key=errors.get) != "max", errors
    assert errors["max"] > 3 * errors[summary["calibrator_chosen"]], errors
    # the same model as asking for the winner by name
    fixed = quantize(model, calib, recipe=[{"quantize": {"calibrator": summary["calibrator_chosen"]}}], batch_size=32,
                     show_progress=False, log=lambda *_: None)
    probe = {"x": np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run(chosen, probe)[0], run(fixed, probe)[0])


def test_auto_beats_max_on_held_out_inputs(heavy_tailed):
    model, calib = heavy_tailed
    probe = {"x": np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)}
    reference = run(model, probe)[0]
    sqnr = {c: sqnr_db(reference, run(quantize(model, calib, recipe=[{"quantize": {"calibrator": c}}], batch_size=32,
                                               show_progress=False, log=lambda *_: None), probe)[0])
            for c in ("auto", "max")}
    assert sqnr["auto"] > sqnr["max"] + 6, sqnr


def test_unknown_calibrator_is_refused_with_the_choices():
    model = _linear_model(np.eye(4, dtype=np.float32))
    with pytest.raises(Exception, match="calibrator.*is not one of .*auto"):
        quantize(model, {"x": np.ones((2, 4), np.float32)}, recipe=[{"quantize": {"calibrator": "best"}}],
                 show_progress=False, log=lambda *_: None)
