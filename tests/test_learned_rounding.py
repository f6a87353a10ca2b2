"""rounding: adaround | flexround in the quantize step: weights learned block by block against the float
block's outputs, written as the same integer weights with a DequantizeLinear as round-to-nearest writes."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import mobilenet_block_model, random_images
from conftest import assert_lint_clean, run, sqnr_db
from onnxq import quantize
from onnxq.errors import OnnxqError

pytest.importorskip("torch")

OPTS = {"show_progress": False, "log": lambda *_: None}


def w4_recipe(rounding: str, iterations: int = 300) -> list:
    return ["fold_batchnorm", {"upgrade_opset": {"opset": 21}}, {"quantize": {"weight_bits": 4, "calibrator": "max", "weight_calibrator": "max",
                                            "bias_correction": False, "rounding": rounding,
                                            "learn_iterations": iterations}}]


def quantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_quantized")}


def quantize_w4(model, calib, rounding: str, iterations: int = 300) -> onnx.ModelProto:
    return quantize(model, calib, recipe=w4_recipe(rounding, iterations), batch_size=16, **OPTS)


def test_flexround_lowers_the_output_error_of_w4_weights_on_held_out_data(torch_one_thread):
    model = mobilenet_block_model(channels=8, seed=3)
    calib = {"input": random_images(64, seed=1)}
    held_out = random_images(64, seed=2)
    nearest = quantize_w4(model, calib, "nearest")
    learned = quantize_w4(model, calib, "flexround")
    ref = run(model, {"input": held_out})[0]
    sqnr_nearest = sqnr_db(ref, run(nearest, {"input": held_out})[0])
    sqnr_learned = sqnr_db(ref, run(learned, {"input": held_out})[0])
    assert sqnr_learned > sqnr_nearest + 1.0, (sqnr_nearest, sqnr_learned)
    assert_same_format(nearest, learned)


def test_adaround_writes_the_same_format_and_reports_its_blocks(torch_one_thread):
    model = mobilenet_block_model(channels=8, seed=3)
    calib = {"input": random_images(32, seed=1)}
    logs = []
    learned = quantize(model, calib, recipe=w4_recipe("adaround", 100), batch_size=16, show_progress=False,
                       log=logs.append)
    assert any("adaround learned 5 weights in 2 blocks" in line for line in logs), logs
    assert_same_format(quantize_w4(model, calib, "nearest"), learned, moved=False)


@pytest.mark.parametrize("method", ["adaround", "flexround"])
def test_learned_weights_keep_a_wider_head_on_its_own_grid(torch_one_thread, method):
    """head_bits 8 under INT4: the classifier is learned and stored on the INT8 grid (a learned weight
    once took the step's INT4 format whatever its own width, and ORT refused the model)."""
    model = mobilenet_block_model(channels=8, seed=3)
    calib = {"input": random_images(32, seed=1)}
    steps = w4_recipe(method, 50)
    steps[-1]["quantize"]["head_bits"] = 8
    learned = quantize(model, calib, recipe=steps, batch_size=16, **OPTS)
    weights = quantized_weights(learned)
    head = next(v for k, v in weights.items() if k.startswith("fc.weight"))
    assert head.dtype == np.int8 and np.abs(head.astype(int)).max() > 7  # uses the INT8 range
    assert all(v.dtype != np.int8 for k, v in weights.items() if not k.startswith("fc.weight"))
    assert sqnr_db(run(model, {"input": random_images(8, seed=2)})[0], run(learned, {"input": random_images(8, seed=2)})[0]) > 10
    assert_lint_clean(learned)


def assert_same_format(nearest: onnx.ModelProto, learned: onnx.ModelProto, moved: bool = True) -> None:
    """The same ops, INT4 weight tensors and scale shapes as round-to-nearest; lint clean."""
    assert sorted(n.op_type for n in learned.graph.node) == sorted(n.op_type for n in nearest.graph.node)
    q_nearest, q_learned = quantized_weights(nearest), quantized_weights(learned)
    assert q_nearest.keys() == q_learned.keys() and q_nearest
    assert all(q_learned[k].dtype == q_nearest[k].dtype and q_learned[k].shape == q_nearest[k].shape for k in q_nearest)
    if moved:
        assert any(not np.array_equal(q_learned[k], q_nearest[k]) for k in q_nearest)
    assert all(-8 <= q_learned[k].astype(int).min() and q_learned[k].astype(int).max() <= 7 for k in q_learned)
    assert_lint_clean(learned)


def test_learned_rounding_is_refused_as_an_option_value_it_does_not_know():
    with pytest.raises(OnnxqError, match="option 'rounding'"):
        quantize(mobilenet_block_model(), {"input": random_images(4)}, recipe=[{"quantize": {"rounding": "brecq"}}],
                 **OPTS)


def test_learn_iterations_is_bounded():
    with pytest.raises(OnnxqError, match="learn_iterations"):
        quantize(mobilenet_block_model(), {"input": random_images(4)},
                 recipe=[{"quantize": {"rounding": "adaround", "learn_iterations": 0}}], **OPTS)


def test_learn_regulariser_reaches_adaround_and_is_bounded(torch_one_thread):
    """AdaRound's λ from the recipe is the one the learner uses: with the same seed, a λ far below and
    one far above the default end on different integers."""
    with pytest.raises(OnnxqError, match="learn_regulariser"):
        quantize(mobilenet_block_model(), {"input": random_images(4)},
                 recipe=[{"quantize": {"rounding": "adaround", "learn_regulariser": 0}}], **OPTS)
    model = mobilenet_block_model(channels=8, seed=3)
    calib = {"input": random_images(32, seed=1)}

    def integers(regulariser: float) -> dict[str, np.ndarray]:
        recipe = w4_recipe("adaround", 100)
        recipe[-1]["quantize"]["learn_regulariser"] = regulariser
        return quantized_weights(quantize(model, calib, recipe=recipe, batch_size=16, **OPTS))

    weak, strong = integers(1e-3), integers(1e5)
    assert weak.keys() == strong.keys()
    assert any(not np.array_equal(weak[k], strong[k]) for k in weak)


def test_bert_layers_learn_at_a_batch_size_other_than_one(torch_one_thread, tmp_path):
    """A BERT export computes its batch size once (Shape → Gather) and every layer's Reshape reads it: a
    layer block then gets that number as a shared input, valid for batches of the captured size only.
    Learning runs such blocks on batches of exactly that size, and every layer is learned."""
    from transformer_builders import export, feeds_for, tiny_bert

    path = export(tiny_bert(), tmp_path / "bert.onnx", "bert")
    calib, held_out = feeds_for("bert", 32, seed=1), feeds_for("bert", 8, seed=2)
    reference = run(onnx.load(str(path)), held_out)[0]
    logs = []
    errors = {}
    for rounding in ("nearest", "flexround"):
        steps = [{"include": "transformer-w4a8", "override": {"quantize": {"rounding": rounding, "learn_iterations": 60}}}]
        model = quantize(path, calib, recipe=steps, batch_size=8, show_progress=False, log=logs.append)
        errors[rounding] = float(np.mean((run(model, held_out)[0] - reference) ** 2))
    assert any("runs 8 samples at a time" in str(line) for line in logs)  # said, not silent
    assert any("flexround learned 12 weights" in str(line) for line in logs), [str(x) for x in logs if "learn" in str(x)]
    assert errors["flexround"] < errors["nearest"], errors
