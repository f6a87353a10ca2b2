"""QSUR (quantization-space utilisation): the diagnostic's number on data whose answer is known, and
on a real ONNX model's linear inputs read through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION
from onnxq.stats.qsur import linear_inputs, model_utilisation, utilisation

R = np.random.default_rng(0)


def _hadamard(d: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def test_isotropic_data_fills_the_grid_and_an_outlier_channel_empties_it():
    iso = R.normal(size=(20000, 16))
    assert 0.9 < utilisation(iso) <= 1.0
    outlier = iso.copy()
    outlier[:, 3] *= 100.0  # one channel sets the per-tensor step
    assert utilisation(outlier) < 0.1


def test_rotation_spreads_an_outlier_and_scaling_equalises_it():
    x = R.normal(size=(20000, 16))
    x[:, 3] *= 100.0
    rotated = x @ _hadamard(16)
    assert utilisation(rotated) > 3 * utilisation(x)  # the max falls, the volume stays
    scaled = x / x.std(axis=0)
    assert utilisation(scaled) > 0.9


def test_a_mean_offset_costs_grid():
    x = R.normal(size=(20000, 8))
    assert utilisation(x + 3.0) < 0.6 * utilisation(x)


def test_a_constant_channel_is_left_out_and_too_few_vectors_give_nan():
    x = R.normal(size=(5000, 8))
    with_dead = np.concatenate([x, np.full((5000, 1), 2.0)], axis=1)
    assert utilisation(with_dead) == utilisation(x)
    assert np.isnan(utilisation(x[:15]))  # 15 vectors of 8 channels: the small eigenvalues are noise
    assert np.isnan(utilisation(np.ones((100, 4))))


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w"], ["a"], name="mm1"),
         helper.make_node("MatMul", ["r", "w"], ["b"], name="mm2"),
         helper.make_node("MatMul", ["b", "bt"], ["c"], name="act_product"),
         helper.make_node("MatMul", ["a", "w2"], ["d"], name="mm3"), helper.make_node("Add", ["c", "d"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
              helper.make_tensor_value_info("bt", TensorProto.FLOAT, [4, 4])],  # b·bt: an activation product
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def test_model_utilisation_reads_each_weighted_matmul_input_once():
    model = ir.serde.deserialize_model(_model())
    assert linear_inputs(model) == {"mm1": "r", "mm2": "r", "mm3": "a"}
    x = R.normal(size=(500, 8)).astype(np.float32)
    bt = np.eye(4, dtype=np.float32)
    got = model_utilisation(model, [{"x": x[:250], "bt": bt}, {"x": x[250:], "bt": bt}])
    assert set(got) == {"mm1", "mm2", "mm3"} and got["mm1"] == got["mm2"]
    np.testing.assert_allclose(got["mm1"], utilisation(np.maximum(x, 0)), rtol=1e-5)
    w = numpy_helper.to_array(_model().graph.initializer[0])
    np.testing.assert_allclose(got["mm3"], utilisation(np.maximum(x, 0) @ w), rtol=1e-4)


def test_a_quantized_model_is_read_where_its_activations_are_quantized():
    """After onnxq, each layer's input is read at its QuantizeLinear: the same tensors as the float
    model's, so the two compare layer by layer."""
    import onnxq

    x = R.normal(size=(256, 8)).astype(np.float32)
    feeds = [{"x": x[i:i + 64], "bt": np.eye(4, dtype=np.float32)} for i in range(0, 256, 64)]
    quantized = onnxq.quantize(_model(), feeds, recipe=["quantize"], show_progress=False, log=lambda *_: None)
    qmodel = ir.serde.deserialize_model(quantized)
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph)
    layers = linear_inputs(qmodel)
    assert set(layers) == {"mm1", "mm2", "mm3"} and layers["mm1"] == "r"
    float_u = model_utilisation(ir.serde.deserialize_model(_model()), feeds)
    quant_u = model_utilisation(qmodel, feeds)
    assert quant_u["mm1"] == float_u["mm1"]  # ReLU output, before anything is quantized
    assert abs(quant_u["mm3"] - float_u["mm3"]) < 0.05 * float_u["mm3"]  # after one quantized layer
