"""split_range's multi-level split (down_ratio) and the outlier part's range margin, on a MatMul built
here: exact in float; after `quantize` the top part's scale is the margin times its calibrated max."""

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, rel_change
from onnxq.api import quantize
from onnxq.ir.graph import Namer
from onnxq.passes.transformer.split_range import split_input
from onnxq.runtime.session import session


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    """Bulk ~N(0, 0.3), rare values up to ~100: the shape of SwiGLU down-projection inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.3, size=(n, 32)).astype(np.float32)
    mask = rng.random(x.shape) < 0.01
    x[mask] = (rng.choice([-1, 1], mask.sum()) * np.exp(rng.uniform(0, np.log(100), mask.sum()))).astype(np.float32)
    return x


def matmul_model() -> ir.Model:
    w = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="down_proj")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w, "w")])
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9))


def split_model(thresholds, margin) -> ir.Model:
    model = matmul_model()
    node = next(iter(model.graph))
    split_input(model.graph, Namer(model.graph), node, thresholds, margin)
    model.graph.sort()
    return model


def test_multilevel_split_is_exact_and_has_one_matmul_per_level():
    x = heavy_tailed(64, seed=2)
    reference = session(matmul_model()).run(None, {"x": x})[0]
    model = split_model([0.5, 4.0, 32.0], margin=4.0)
    assert sum(n.op_type == "MatMul" for n in model.graph) == 4
    assert rel_change(reference, session(model).run(None, {"x": x})[0]) < 1e-5
    top = [n for n in model.graph if n.metadata_props.get("onnxq.range_margin")]
    assert len(top) == 1 and top[0].op_type == "Sub"


def test_quantize_widens_the_tagged_outlier_range_and_only_that():
    calib = heavy_tailed(128, seed=3)
    for margin in (1.0, 4.0):
        q = quantize(ir.to_proto(split_model([0.5, 4.0], margin)), {"x": calib},
                     recipe=[{"quantize": {"calibrator": "max"}}], show_progress=False, log=lambda *_: None)
        assert_lint_clean(q)
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        scales = {n.input[0]: float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"
                  and n.input[0] not in inits}
        rest = np.abs(calib) - 4.0  # what lies beyond the last threshold
        top = next(v for k, v in scales.items() if k.startswith("x_outliers1"))
        assert np.isclose(top * 127, margin * rest.max(), rtol=1e-3)
        first = next(v for k, v in scales.items() if k.startswith("x_inliers") and not k.startswith("x_inliers1"))
        assert np.isclose(first * 127, 0.5, rtol=1e-3)  # inner parts keep their calibrated range
