"""The checks run after every pass: a pass that breaks the model is named, a problem the input
already had is tolerated, and strict (type-checked) shape inference is used when the input passes it."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.ir.checks import find_problem, input_problem
from onnxq.pipeline import GraphPass, Kind, PassContext, run_pipeline


def linear_model(weight_rows: int = 4) -> ir.Model:
    w = np.ones((weight_rows, 3), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


class WidenWeight(GraphPass):
    """A broken pass: gives the MatMul a weight whose rows no longer match x."""

    name = "widen_weight"
    kind = Kind.EXACT

    def apply(self, model, ctx):
        node = next(iter(model.graph))
        wide = ir.Value(name="w_wide", const_value=ir.tensor(np.ones((5, 3), np.float32)))
        model.graph.initializers["w_wide"] = wide
        node.replace_input_with(1, wide)
        return {}


def test_strict_shape_inference_catches_a_mismatch_the_plain_checker_lets_through():
    broken = linear_model(weight_rows=5)
    assert find_problem(broken, strict=False) is None
    assert "Incompatible dimensions" in find_problem(broken, strict=True)
    assert find_problem(linear_model(), strict=True) is None
    assert input_problem(broken) == (False, None)  # the input fails strict mode: later checks are lenient


def test_a_pass_that_breaks_the_model_is_named():
    with pytest.raises(OnnxqError, match="model is invalid after pass 'widen_weight': .*Incompatible dimensions"):
        run_pipeline(linear_model(), [WidenWeight()], PassContext(show_progress=False), verify_exact=False)
