"""smooth's α search must count the weights that take 1/s, not only the readers' error.

A ReLU MLP with dead hidden units (never positive on any input): the down projection's rows for them
are tiny, so the readers-only objective pushes their s towards 1/max_scale, and the up projection's
columns for them grow by 1/s. With per-tensor weights that one column sets the whole tensor's scale
and every other up weight rounds to zero (PETR-tiny's decoder MLPs: mAP 0.59 → 0.00)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.api import quantize
from onnxq.runtime.session import session


def relu_mlp(path, *, dead: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    w_up = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    b_up = np.zeros(32, np.float32)
    b_up[:dead] = -100.0  # these units never pass the ReLU
    w_down = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    w_down[:dead] *= 1e-3
    w_down[dead:dead + 4] *= 8.0  # a few strong live channels, so smoothing has something to do
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["h"], name="up"),
             helper.make_node("Add", ["h", "b_up"], ["hb"], name="up_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w_down"], ["y0"], name="down"),
             helper.make_node("Add", ["y0", "b_down"], ["y"], name="down_bias")]
    inits = [numpy_helper.from_array(w_up, "w_up"), numpy_helper.from_array(b_up, "b_up"),
             numpy_helper.from_array(w_down, "w_down"), numpy_helper.from_array(np.zeros(16, np.float32), "b_down")]
    graph = helper.make_graph(nodes, "relu_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), path)


def test_smooth_with_per_tensor_weights_never_ruins_the_writer(tmp_path):
    path = tmp_path / "mlp.onnx"
    relu_mlp(path)
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(size=(64, 16)).astype(np.float32)}
    held_out = rng.normal(size=(64, 16)).astype(np.float32)

    def errors(steps):
        model = quantize(str(path), calib, output=None, recipe=steps, show_progress=False, log=lambda *_: None)
        out = []
        for x in (calib["x"], held_out):
            ref = session(str(path)).run(None, {"x": x})[0]
            got = session(model).run(None, {"x": x})[0]
            out.append(float(np.sum((got - ref) ** 2) / np.sum(ref ** 2)))
        return out

    plain = errors([{"quantize": {"weights": "per-tensor"}}])
    smoothed = errors([{"smooth": {}}, {"quantize": {"weights": "per-tensor"}}])  # smooth reads the scheme
    # on the rows it was searched on, smoothing (s = 1 is a candidate) is never worse than none; here it
    # halves the error. Before the writer term both errors were 1.0: every up weight rounded to zero.
    assert smoothed[0] <= plain[0], (plain, smoothed)
    assert smoothed[1] < 1e-2, (plain, smoothed)  # held-out rows: the signal survives (> 20 dB)
