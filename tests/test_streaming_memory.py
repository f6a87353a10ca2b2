"""Calibration streams: the whole transformer-w8a8 recipe (smoothing statistics, split thresholds, ranges,
histograms, the auto calibrator's trials, GPTQ Hessians) holds one batch's activations at a time, so
its peak memory does not grow with the calibration set."""

import tracemalloc

import onnx_ir as ir

from onnxq.api import quantize
from onnxq.ir.checks import infer_shapes
from onnxq.ir.modelio import load_model
from onnxq.runtime.session import exposing, session
from transformer_builders import export, feeds_for, tiny_llama


def peak_bytes_while_quantizing(model: ir.Model, calib: dict) -> int:
    """Peak of the memory Python and numpy allocate (ORT's activations reach Python as numpy arrays)."""
    tracemalloc.start()
    try:
        quantize(ir.from_proto(ir.to_proto(model)), calib, batch_size=4, verify_exact=False, show_progress=False,
                 log=lambda *_: None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def activation_bytes(model: ir.Model, calib: dict, batch_size: int) -> int:
    """What holding every float intermediate tensor of every calibration batch would take."""
    infer_shapes(model)
    names = [v.name for node in model.graph for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    sess = session(exposing(model, names))
    one = sess.run(names, {k: v[:batch_size] for k, v in calib.items()})
    return sum(x.nbytes for x in one) * (len(calib["input_ids"]) // batch_size)


def test_peak_memory_does_not_grow_with_the_calibration_set(tmp_path):
    model = load_model(export(tiny_llama(), tmp_path / "llama.onnx", "llama"))
    small, large = feeds_for("llama", 8, seed=1, seq=48), feeds_for("llama", 128, seed=1, seq=48)
    held = activation_bytes(model, large, 4)
    peak_small, peak_large = peak_bytes_while_quantizing(model, small), peak_bytes_while_quantizing(model, large)
    # 16x the data: holding its activations would add `held` bytes; streaming adds next to nothing
    assert held > 2 * peak_small, (held, peak_small)
    assert peak_large < peak_small + 0.1 * held, (peak_small, peak_large, held)
