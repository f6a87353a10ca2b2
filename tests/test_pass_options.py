"""Recipe options are typed and bounded, recipes include and override each other, and passes read
the quantization scheme from the context instead of patched fields."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from builders import mobilenet_block_model, random_images
from onnxq import quantize
from onnxq.errors import OnnxqError
from onnxq.ir.modelio import load_model
from onnxq.pipeline import PassConditionError, PassContext, load_recipe, make_pass, run_pipeline
from onnxq.pipeline.recipes import with_options
from onnxq.quant.scheme import QuantScheme
from onnxq.stats.calib_data import load_calibration

CALIB = {"input": random_images(8)}


@pytest.mark.parametrize("options, message", [
    ({"percentile": -5}, "below its minimum"),
    ({"percentile": 250}, "above its maximum"),
    ({"percentile": "abc"}, "is not a number"),
    ({"bins": 0}, "below its minimum"),
    ({"block_size": -1}, "below its minimum"),
    ({"exclude": 5}, "is not a list"),
    ({"bias_correction": "no"}, "is not true or false"),
    ({"weight_bits": 6}, "is not one of 4, 8"),
    ({"gptq_dampings": [0.1, -1]}, "greater than 0"),
])
def test_bad_option_values_are_refused_naming_pass_and_option(options, message):
    with pytest.raises(OnnxqError, match=rf"pass 'quantize', option '{next(iter(options))}': .*{message}"):
        make_pass("quantize", options)


@pytest.mark.parametrize("pass_name, options, message", [
    ("split_range", {"down_ratio": 0.5}, "would not split further"),
    ("split_range", {"down_percentile": [99.0, 120.0]}, "at most 100"),
    ("split_range", {"outlier_margin": 0.5}, "below its minimum"),
    ("split_range", {"sites": ["down", "up"]}, "is not one of"),
    ("smooth", {"alpha": 2}, "above its maximum"),
    ("smooth", {"sites": ["norm", "qk"]}, "'qk' is not one of"),
    ("qans", {"exp": "lut16"}, "is not one of"),
    ("qans", {"candidates": [8.0, 0.0]}, "greater than 0"),
    ("integer_ops", {"ops": ["softmax", "gelu"]}, "is not one of"),
    ("integer_ops", {"clip": 0}, "greater than 0"),
    ("integer_ops", {"max_row": 1 << 22}, "float32-exact"),
    ("rotate", {"rotation": "givens"}, "is not one of"),
    ("upgrade_opset", {"opset": 11}, "below its minimum 13"),
    ("equalize", {"iterations": 0}, "below its minimum"),
    ("lift_constants", {"min_elements": 0}, "below its minimum"),
])
def test_every_pass_bounds_its_options(pass_name, options, message):
    with pytest.raises(OnnxqError, match=rf"pass '{pass_name}'.*{message}"):
        make_pass(pass_name, options)


def test_good_options_are_accepted_and_the_pass_is_frozen():
    step = make_pass("quantize", {"percentile": 99, "gptq_dampings": [0.1, 1]})
    assert step.percentile == 99.0 and isinstance(step.percentile, float)
    assert step.gptq_dampings == (0.1, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.percentile = 50.0


def test_a_misspelled_excluded_node_is_named():
    with pytest.raises(OnnxqError, match="no node is named or matches 'expand/Conv_typo'"):
        quantize(mobilenet_block_model(), CALIB, recipe=[{"quantize": {"exclude": ["expand/Conv_typo"]}}],
                 show_progress=False, log=lambda _: None)


def test_exclude_takes_regular_expressions():
    q = quantize(mobilenet_block_model(), CALIB, recipe=[{"quantize": {"exclude": ["(expand|project)/Conv"]}}],
                 show_progress=False, log=lambda _: None)
    conv_inputs = {n.name: [i for i in n.input] for n in q.graph.node if n.op_type == "Conv"}
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers[conv_inputs["expand/Conv"][0]] != "DequantizeLinear"
    assert producers[conv_inputs["depthwise/Conv"][0]] == "DequantizeLinear"


def test_an_empty_recipe_list_is_an_error_not_the_float_model():
    with pytest.raises(OnnxqError, match="empty"):
        quantize(mobilenet_block_model(), CALIB, recipe=[], show_progress=False)


def test_include_with_override_changes_only_the_named_options(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("passes:\n  - include: transformer-w8a8\n    override:\n      quantize: {weight_bits: 4, block_size: 32}\n"
                      "      upgrade_opset: {opset: 21}\n")
    _, mine = load_recipe(recipe)
    _, base = load_recipe("transformer-w8a8")
    assert [p.name for p in mine] == [p.name for p in base]
    q_mine, q_base = mine[-1], base[-1]
    assert (q_mine.weight_bits, q_mine.block_size) == (4, 32)
    assert dataclasses.replace(q_mine, weight_bits=8, block_size=0) == q_base
    _, w4a8 = load_recipe("transformer-w4a8")
    assert w4a8[:-1] == mine[:-1] and w4a8[-1] == dataclasses.replace(q_mine, calibrator="max", head_bits=8)


def test_override_of_a_pass_the_recipe_lacks_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("passes:\n  - include: default\n    override:\n      smooth: {alpha: 0.5}\n")
    with pytest.raises(OnnxqError, match="does not run"):
        load_recipe(recipe)


def test_with_options_validates_and_copies():
    step = make_pass("quantize")
    changed = with_options(step, weights="per-tensor")
    assert step.weights == "per-channel" and changed.weights == "per-tensor"
    with pytest.raises(OnnxqError, match="option 'weights'"):
        with_options(step, weights="per-row")


def test_equalize_chooses_scales_for_the_schemes_weight_granularity():
    """equalize reads the granularity from ctx.scheme: per-tensor weights get the range-balancing
    scales, per-channel weights keep the data-driven ones, so the two results differ."""
    results = {}
    for weights in ("per-channel", "per-tensor"):
        model = load_model(mobilenet_block_model())
        passes = [make_pass(n) for n in ("fold_batchnorm", "equalize")]
        data = load_calibration(CALIB, model)
        data_ctx = PassContext(calibration=data, scheme=QuantScheme(weights=weights), show_progress=False,
                               log=lambda _: None)
        run_pipeline(model, passes, data_ctx, verify_exact=False)
        results[weights] = np.concatenate([np.asarray(v.const_value.numpy()).ravel()
                                           for v in model.graph.initializers.values() if v.name.endswith("weight")
                                           or "equalized" in v.name])
    assert not np.allclose(results["per-channel"], results["per-tensor"])


def test_order_rules_are_preconditions():
    model = load_model(mobilenet_block_model())
    step = make_pass("quantize", {"weight_bits": 4, "block_size": 32})
    with pytest.raises(PassConditionError, match="opset >= 21"):
        run_pipeline(model, [step], PassContext(calibration=None, show_progress=False), verify_exact=False)


def test_a_pass_runs_as_a_plain_onnx_ir_pass():
    model = load_model(mobilenet_block_model())
    before = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
    result = make_pass("fold_batchnorm")(model)
    assert result.model is model and before == 4
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(__import__("onnx_ir").to_proto(model)))


@pytest.mark.parametrize("recipe, message", [
    (["quantize", "equalize"], "pass 'equalize' rewrites the float graph: put it before 'quantize'"),
    (["recentre", "quantize"], "pass 'recentre' works on the quantized graph: put it after 'quantize'"),
    (["quantize", "quantize"], "quantized already"),
])
def test_recipe_order_mistakes_stop_with_the_rule(recipe, message):
    with pytest.raises(OnnxqError, match=message):
        quantize(mobilenet_block_model(), CALIB, recipe=recipe, show_progress=False, log=lambda _: None)


def test_quantize_that_quantizes_nothing_is_an_error():
    with pytest.raises(OnnxqError, match="inserted no Q/DQ node"):
        quantize(mobilenet_block_model(), CALIB, recipe=[{"quantize": {"exclude": [".*"], "unknown_ops": "float"}}],
                 show_progress=False, log=lambda _: None)


@pytest.mark.parametrize("options, message", [
    ({"entries": [1, 1]}, r"option 'entries': \[1, 1\] is below its minimum 2 \(every value must be at least 2\)"),
    ({"margin": -5}, "option 'margin': -5.0 is below its minimum"),
    ({"table": "cubic"}, "option 'table': 'cubic' is not one of"),
])
def test_lookup_table_options_are_bounded(options, message):
    """Before the bounds, entries [1, 1] ended in an internal error and a negative margin ran silently."""
    with pytest.raises(OnnxqError, match=message):
        make_pass("dulut", options)
