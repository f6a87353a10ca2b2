"""Learned rounding by block reconstruction: the torch converter against ORT op by op, fake quantization
against ORT's Q/DQ graph, AdaRound and FlexRound against round-to-nearest, and fold-back exactness."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, mobilenet_block_model
from conftest import run

torch = pytest.importorskip("torch")

from onnxq.quant.qdq import INT8, Planner
from onnxq.quant.reconstruct.blocks import (
    block_between,
    block_from_nodes,
    block_of_range,
    cnn_blocks,
    transformer_blocks,
)
from onnxq.quant.reconstruct.fold_back import fold_back, insert_activation_points, learned_weights
from onnxq.quant.reconstruct.points import ActivationPoint, QuantPoints, points_from_plan, weight_point
from onnxq.quant.reconstruct.rounding import LearnConfig, NothingToLearn, block_output_mse, learn_rounding
from onnxq.quant.reconstruct.torch_block import BlockModule
from onnxq.quant.reconstruct.torch_ops import UnsupportedOp
from onnxq.quant.targets import get_target

pytestmark = pytest.mark.usefixtures("torch_one_thread")
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def make_model(nodes, inputs: dict, inits: dict, outputs: list[str], opset: int = 21, batch: bool = False
               ) -> onnx.ModelProto:
    """A model of `nodes`; inputs typed by the example arrays (`batch`: a free first dimension)."""
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info(n, F, ["N", *a.shape[1:]] if batch else list(a.shape))
                         for n, a in inputs.items()],
        [helper.make_tensor_value_info(n, F, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    return onnx.shape_inference.infer_shapes(model)


def torch_run(proto: onnx.ModelProto, feeds: dict, points: QuantPoints | None = None) -> list[np.ndarray]:
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    module = BlockModule(block, points, model=model)
    by_name = {v.name: v for v in block.inputs}
    with torch.no_grad():
        outs = module(*[torch.from_numpy(feeds[v.name]) for v in block.inputs if v.name in by_name])
    order = [v.name for v in block.outputs]
    return [outs[order.index(o.name)].numpy() for o in proto.graph.output]


def run_as_written(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """ORT without its extended fusions: those replace an INT4 DequantizeLinear→MatMul by the MatMulNBits
    kernel, which computes in its own precision (about 1e-2 off here), so the graph itself is compared."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs)


R = np.random.default_rng(0)
X4 = R.normal(size=(2, 4, 7, 6)).astype(np.float32)
X3 = R.normal(size=(2, 5, 8)).astype(np.float32)
W_CONV = R.normal(size=(6, 2, 3, 2)).astype(np.float32)
W_MAT = R.normal(size=(8, 3)).astype(np.float32)
I = lambda *v: np.array(v, dtype=np.int64)
S = lambda v: np.array(v, dtype=np.float32)

# id: (nodes, inputs, initializers, opset)
CASES = {
    "conv_groups_pads_strides_dilations": ([node("Conv", ["x", "w", "b"], ["y"], group=2, pads=[1, 0, 2, 1],
                                                 strides=[2, 1], dilations=[1, 2])],
                                           {"x": X4}, {"w": W_CONV, "b": R.normal(size=6).astype(np.float32)}, 21),
    "conv1d": ([node("Conv", ["x", "w"], ["y"], pads=[1, 1])], {"x": X3},
               {"w": R.normal(size=(4, 5, 3)).astype(np.float32)}, 21),
    "gemm_trans_alpha_beta": ([node("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=1, alpha=0.7, beta=1.3)],
                              {"x": R.normal(size=(8, 4)).astype(np.float32)},
                              {"w": R.normal(size=(3, 8)).astype(np.float32), "c": R.normal(size=3).astype(np.float32)}, 21),
    "matmul_const_and_activations": ([node("MatMul", ["x", "w"], ["m"]), node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
                                      node("MatMul", ["t", "m"], ["y"])], {"x": X3}, {"w": W_MAT}, 21),
    "arithmetic_broadcast": ([node("Add", ["x", "c"], ["a"]), node("Sub", ["a", "x"], ["s"]), node("Mul", ["s", "x"], ["m"]),
                              node("Div", ["m", "d"], ["y"])], {"x": X3}, {"c": S([1.5]), "d": S(np.arange(1, 9))}, 21),
    "activations": ([node("Relu", ["x"], ["r"]), node("Sigmoid", ["x"], ["sg"]), node("Tanh", ["x"], ["th"]),
                     node("Erf", ["x"], ["ef"]), node("HardSigmoid", ["x"], ["hs"], alpha=0.3, beta=0.4),
                     node("HardSwish", ["x"], ["hw"]), node("Clip", ["x", "lo", "hi"], ["cl"]),
                     node("Add", ["r", "sg"], ["y0"]),
                     node("Add", ["th", "ef"], ["y1"]), node("Add", ["hs", "hw"], ["y2"]), node("Add", ["y2", "cl"], ["y3"]),
                     node("Add", ["y0", "y1"], ["y4"]), node("Add", ["y3", "y4"], ["y"])],
                    {"x": X3}, {"lo": S(-0.5), "hi": S(0.8)}, 21),
    "min_max_abs_variadic": ([node("Max", ["x", "lo"], ["a"]), node("Min", ["a", "hi", "x"], ["b"]), node("Abs", ["b"], ["y"])],
                             {"x": X3}, {"lo": S(-0.5), "hi": S(np.linspace(0.1, 0.9, 8))}, 21),
    "gelu_exact_and_tanh": ([node("Gelu", ["x"], ["a"]), node("Gelu", ["x"], ["b"], approximate="tanh"),
                             node("Add", ["a", "b"], ["y"])], {"x": X3}, {}, 20),
    "softmax_13": ([node("Softmax", ["x"], ["y"], axis=1)], {"x": X3}, {}, 13),
    "softmax_11_coerced": ([node("Softmax", ["x"], ["y"], axis=1)], {"x": X3}, {}, 11),
    "layernorm": ([node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-3)], {"x": X3},
                  {"g": R.normal(size=8).astype(np.float32), "b": R.normal(size=8).astype(np.float32)}, 17),
    "reducemean_pow_sqrt_13": ([node("Pow", ["x", "two"], ["p"]), node("ReduceMean", ["p"], ["m"], axes=[-1]),
                                node("Sqrt", ["m"], ["s"]), node("Div", ["x", "s"], ["y"])], {"x": X3}, {"two": S(2.0)}, 13),
    "reducemean_18_axes_input": ([node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], {"x": X3}, {"axes": I(1, 2)}, 18),
    "reshape_from_shape_gather_concat": (
        [node("Shape", ["x"], ["sh"]), node("Gather", ["sh", "i0"], ["n"], axis=0), node("Unsqueeze", ["n", "ax0"], ["n1"]),
         node("Concat", ["n1", "rest"], ["shape"], axis=0), node("Reshape", ["x", "shape"], ["y"])],
        {"x": X3}, {"i0": np.array(0, np.int64), "ax0": I(0), "rest": I(-1, 4)}, 21),
    "reshape_zero_flatten_transpose": ([node("Reshape", ["x", "s"], ["r"]), node("Transpose", ["r"], ["t"]),
                                        node("Flatten", ["t"], ["y"], axis=2)], {"x": X3}, {"s": I(0, -1, 4)}, 21),
    "split_concat_13": ([node("Split", ["x", "sp"], ["a", "b"], axis=2), node("Concat", ["b", "a"], ["y"], axis=2)],
                        {"x": X3}, {"sp": I(3, 5)}, 13),
    "split_num_outputs_18": ([node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3),
                              node("Concat", ["c", "a", "b"], ["y"], axis=2)], {"x": X3}, {}, 18),
    "slice_negative_step_axes": ([node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], {"x": X3},
                                 {"st": I(-1, 1), "en": I(-100, 7), "ax": I(2, 1), "sp": I(-2, 2)}, 21),
    "squeeze_unsqueeze": ([node("Unsqueeze", ["x", "a"], ["u"]), node("Squeeze", ["u", "a"], ["y"])], {"x": X3},
                          {"a": I(1, -1)}, 21),
    "global_average_pool": ([node("GlobalAveragePool", ["x"], ["y"])], {"x": X4}, {}, 21),
    "average_pool_pads_ceil": ([node("AveragePool", ["x"], ["a"], kernel_shape=[3, 2], pads=[1, 0, 1, 1], strides=[2, 2],
                                     ceil_mode=1),
                                node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                                     count_include_pad=1), node("ReduceMean", ["b"], ["bm"], axes=[2, 3]),
                                node("Add", ["a", "bm"], ["y"])], {"x": X4}, {}, 13),
    "max_pool_pads_ceil_dilations": ([node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 0, 0, 1],
                                           strides=[2, 2], dilations=[1, 2], ceil_mode=1)], {"x": X4}, {}, 21),
    "identity_cast_constant_of_shape": ([node("Identity", ["x"], ["i"]), node("Cast", ["i"], ["c"], to=F),
                                         node("Shape", ["x"], ["sh"]),
                                         node("ConstantOfShape", ["sh"], ["k"], value=helper.make_tensor("v", F, [1], [0.25])),
                                         node("Add", ["c", "k"], ["y"])], {"x": X3}, {}, 21),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converter_matches_ort(case):
    nodes, inputs, inits, opset = CASES[case]
    proto = make_model(nodes, inputs, inits, ["y"], opset)
    expected = run(proto, inputs)[0]
    got = torch_run(proto, inputs)[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_unsupported_op_is_named():
    proto = make_model([node("Einsum", ["x", "x"], ["y"], equation="abc,abc->ab")], {"x": X3}, {}, ["y"])
    with pytest.raises(UnsupportedOp, match="Einsum"):
        torch_run(proto, {"x": X3})


# --- blocks ---------------------------------------------------------------------------------------------


def test_blocks_of_a_residual_cnn():
    model = ir.from_proto(mobilenet_block_model())
    blocks = cnn_blocks(model.graph, max_weighted=2)
    # stem+expand | depthwise+project+Add | pool+fc; the first block's output is read by the residual Add too
    assert [len(b.weight_values) for b in blocks] == [2, 2, 1]
    assert blocks[1].nodes[-1].op_type == "Add"
    assert [v.name for v in blocks[0].inputs] == ["input"]
    assert {v.name for v in blocks[0].outputs} == {"stem.act", "expand.act"}
    assert {v.name for v in blocks[1].inputs} == {"stem.act", "expand.act"}
    assert [v.name for v in blocks[1].outputs] == ["block.out"]
    assert [v.name for v in blocks[2].outputs] == ["logits"]
    between = block_between(model.graph, [model.graph.node("stem/Clip").outputs[0]],
                            [model.graph.node("block/Add").outputs[0]])
    assert [len(between.weight_values), between.nodes[0].name] == [3, "expand/Conv"]
    assert [len(b.weight_values) for b in cnn_blocks(model.graph)] == [4, 1]
    first = block_of_range(model.graph, 0, 4)  # stem Conv, BN, Clip, expand Conv
    assert [n.op_type for n in first.nodes] == ["Conv", "BatchNormalization", "Clip", "Conv"]
    assert [v.name for v in first.outputs] == ["stem.act", "expand.conv"]
    # no residual stream in a CNN: the transformer helper falls back to node ranges
    assert [len(b.weight_values) for b in transformer_blocks(model, max_weighted=2)] == [2, 2, 1]


# --- fake quantization and fold-back against ORT ----------------------------------------------------------


def conv_block() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"w1": rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * 0.2, "b1": rng.normal(size=16).astype(np.float32) * 0.1,
             "w2": rng.normal(size=(8, 16, 1, 1)).astype(np.float32) * 0.3}
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "w2"], ["c2"]), node("Add", ["x", "c2"], ["y"])]
    return make_model(nodes, {"x": np.zeros((1, 8, 6, 6), np.float32)}, inits, ["y"], 21, batch=True)


def mlp_block() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(size=(16, 32)).astype(np.float32) * 0.25, "b1": rng.normal(size=32).astype(np.float32) * 0.1,
             "w2": rng.normal(size=(16, 32)).astype(np.float32) * 0.2}
    nodes = [node("MatMul", ["x", "w1"], ["m1"]), node("Add", ["m1", "b1"], ["a1"]), node("Gelu", ["a1"], ["g"]),
             node("Gemm", ["g", "w2"], ["y"], transB=1)]
    return make_model(nodes, {"x": np.zeros((1, 16), np.float32)}, inits, ["y"], 21, batch=True)


def planned_points(proto, x, *, bits=8, per_channel=True, target="tensorrt", block_size=0):
    """The target's Q/DQ plan for the whole model as points, activation ranges from ORT on `x`."""
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    plan = Planner(model.graph, get_target(target).table, target=target).run()
    names = [v.name for v in plan.activations]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend([helper.make_tensor_value_info(n, F, None) for n in names if n != "x"])
    values = dict(zip(["y", *[n for n in names if n != "x"]], run(probe, {"x": x})))
    values["x"] = x
    ranges = {n: (float(values[n].min()), float(values[n].max())) for n in names}
    return points_from_plan(block, plan, ranges, per_channel=per_channel, weight_bits=bits, block_size=block_size)


def folded(proto, points, module=None) -> onnx.ModelProto:
    """The QDQ graph: activation Q/DQ at the points, weights folded from `module` (nearest when None)."""
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    module = module or BlockModule(block, points, model=model)
    insert_activation_points(model.graph, points)
    fold_back(model.graph, block, module)
    return ir.to_proto(model)


def forward(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


def assert_same_up_to_flips(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal within 1e-5 except where a hidden activation sat on a rounding boundary: torch and ORT
    accumulate a Conv or MatMul in different orders, so its last bit (and then one integer) may differ.
    Such flips touch few elements, each by about one activation step times a weight."""
    close = np.isclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    assert close.mean() > 0.95, f"{(~close).sum()} of {close.size} elements differ"
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("make,shape,target,per_channel", [
    (conv_block, (4, 8, 6, 6), "tensorrt", True), (conv_block, (4, 8, 6, 6), "ort-cpu", False),
    (mlp_block, (8, 16), "tensorrt", True), (mlp_block, (8, 16), "ort-cpu", True)])
def test_fake_quant_forward_equals_ort_qdq(make, shape, target, per_channel):
    proto = make()
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    points = planned_points(proto, x, per_channel=per_channel, target=target)
    assert points.activations and points.weights
    model = ir.from_proto(proto)
    module = BlockModule(block_from_nodes(model.graph, list(model.graph)), points, model=model)
    qdq = folded(proto, points)
    assert {n.op_type for n in qdq.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    expected = run_as_written(qdq, {"x": x})[0]
    assert_same_up_to_flips(forward(module, x), expected)
    # and the quantization is really there: the float block differs by more than float error
    module.quantized = False
    assert np.abs(forward(module, x) - expected).max() > 1e-3 * np.abs(expected).max()


def test_blocked_int4_weights_equal_ort_qdq():
    proto = mlp_block()
    x = np.random.default_rng(7).normal(size=(8, 16)).astype(np.float32)
    points = planned_points(proto, x, bits=4, block_size=8)
    assert {p.scale.shape for p in points.weights.values()} == {(2, 32), (16, 4)}  # blocks along the input axis
    model = ir.from_proto(proto)
    module = BlockModule(block_from_nodes(model.graph, list(model.graph)), points, model=model)
    qdq = folded(proto, points)
    assert any(a.name == "block_size" for n in qdq.graph.node for a in n.attribute)
    assert_same_up_to_flips(forward(module, x), run_as_written(qdq, {"x": x})[0])


def test_graph_qdq_nodes_run_as_fake_quant():
    """A block cut from a graph that already holds Q/DQ pairs computes what ORT does."""
    proto = conv_block()
    x = np.random.default_rng(4).normal(size=(4, 8, 6, 6)).astype(np.float32)
    qdq = folded(proto, planned_points(proto, x))
    assert_same_up_to_flips(torch_run(qdq, {"x": x})[0], run_as_written(qdq, {"x": x})[0])


# --- learned rounding ------------------------------------------------------------------------------------


def weight_points(proto, bits, act_scale=None) -> QuantPoints:
    """W`bits` per-channel weights (max scales); optionally the block's input at a per-tensor INT8 scale.

    Only the input is quantized so that torch and ORT round the same float numbers: a hidden activation
    computed by two libraries can differ in its last bit and flip a rounding."""
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    points = QuantPoints()
    for slot in block.weights:
        out_axis = 0 if slot.node.op_type == "Conv" or slot.node.op_type == "Gemm" else 1
        points.weights[slot.value.name] = weight_point(slot.value.const_value.numpy(), out_axis, bits=bits)
    if act_scale is not None:
        first = block.weights[0].node
        points.activations[first.inputs[0].name] = ActivationPoint(act_scale, 0, INT8, frozenset({(first.name, 0)}))
    return points


@pytest.mark.parametrize("method", ["adaround", "flexround"])
@pytest.mark.parametrize("make,shape", [(conv_block, (96, 8, 6, 6)), (mlp_block, (256, 16))])
def test_learned_rounding_beats_nearest_and_folds_back_exactly(method, make, shape):
    proto = make()
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(np.float32)
    target = run(proto, {"x": x})[0]
    points = weight_points(proto, bits=4, act_scale=4.0 / 127)
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    module = BlockModule(block, points, model=model)
    nearest_mse = block_output_mse(module, [x], [target])
    seen = []
    config = LearnConfig(method=method, iterations=250, batch_size=32, lr=0.05 if method == "adaround" else 3e-4, seed=0)
    report = learn_rounding(module, [x], config=config, progress=lambda i, n, loss: seen.append(i))
    assert seen[-1] == 250 and not report.kept_nearest
    learned_mse = block_output_mse(module, [x], [target])
    assert report.mse_nearest == pytest.approx(nearest_mse, rel=1e-4)
    assert learned_mse < 0.85 * nearest_mse, (learned_mse, nearest_mse)

    # the folded graph holds INT4 integers with per-channel scales, and ORT computes the learned block
    qdq = folded(proto, points, module)
    weights = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for name in learned_weights(module):
        assert weights[f"{name}_scale"].shape == np.shape(points.weights[name].scale)
        assert qdq.graph.initializer[[t.name for t in qdq.graph.initializer].index(f"{name}_quantized")].data_type \
            == TensorProto.INT4
        assert name not in weights  # the float weight is gone
    x_eval = rng.normal(size=(16, *shape[1:])).astype(np.float32)
    expected = run_as_written(qdq, {"x": x_eval})[0]
    np.testing.assert_allclose(forward(module, x_eval), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_flexround_per_tensor_folds_to_one_scale():
    """Per tensor, FlexRound's learned s₁ is one number per weight, and the folded graph stays exact."""
    proto = mlp_block()
    rng = np.random.default_rng(8)
    x = rng.normal(size=(128, 16)).astype(np.float32)
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    points = QuantPoints({}, {s.value.name: weight_point(s.value.const_value.numpy(), 1 if s.node.op_type == "MatMul" else 0,
                                                        per_channel=False, bits=4) for s in block.weights})
    module = BlockModule(block, points, model=model)
    report = learn_rounding(module, [x], config=LearnConfig(method="flexround", iterations=100, batch_size=32))
    assert report.mse_learned < report.mse_nearest
    qdq = folded(proto, points, module)
    scales = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer if t.name.endswith("_scale")}
    assert {v.shape for v in scales.values()} == {()}
    assert not np.allclose(scales["w1_scale"], points.weights["w1"].scale)  # s₁ was learned
    x_eval = rng.normal(size=(16, 16)).astype(np.float32)
    expected = run_as_written(qdq, {"x": x_eval})[0]
    np.testing.assert_allclose(forward(module, x_eval), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_onnxq_does_not_import_the_package_or_torch():
    import subprocess
    import sys

    code = ("import sys, onnxq.api, onnxq.pipeline.run, onnxq.pipeline.registry, onnxq.cli.main, onnxq.quant.qdq; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('onnxq.quant.reconstruct')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_learning_is_seeded():
    proto = mlp_block()
    x = np.random.default_rng(6).normal(size=(64, 16)).astype(np.float32)
    results = []
    for _ in range(2):
        model = ir.from_proto(proto)
        module = BlockModule(block_from_nodes(model.graph, list(model.graph)), weight_points(proto, 4), model=model)
        learn_rounding(module, [x], config=LearnConfig(method="flexround", iterations=20, batch_size=16, seed=3))
        results.append({k: q for k, (q, _) in learned_weights(module).items()})
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_transformer_layer_block_matches_ort(tmp_path):
    """Each pre-LN decoder layer of a torch export is one block with its six linear weights (the causal
    mask, built once, goes with the first layer and is an input of the second); the converter computes
    what ORT does, and the layer's rounding can be learned."""
    from transformer_builders import export, feeds_for, tiny_gpt

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(export(tiny_gpt(hidden=32), tmp_path / "gpt.onnx", "gpt"))))
    model = ir.from_proto(proto)
    blocks = transformer_blocks(model)
    assert len(blocks) == 2 and [len(b.weight_values) for b in blocks] == [6, 6]
    assert blocks[0].outputs[-1] in blocks[1].inputs  # the residual stream runs from one layer into the next
    assert not any(v.is_graph_input() for v in blocks[1].inputs)
    assert not set(blocks[0].nodes) & set(blocks[1].nodes)
    block = blocks[1]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    wanted = [v.name for v in [*block.inputs, *block.outputs] if not v.is_graph_input()]
    probe.graph.output.extend([helper.make_tensor_value_info(n, F, None) for n in wanted])
    feeds = feeds_for("gpt", 16)
    values = {**feeds, **dict(zip([o.name for o in probe.graph.output], run(probe, feeds)))}
    points = QuantPoints({}, {s.value.name: weight_point(s.value.const_value.numpy(), 1, bits=4) for s in block.weights})
    module = BlockModule(block, points, model=model)
    module.quantized = False
    inputs = [values[v.name] for v in block.inputs]
    with torch.no_grad():
        outs = module(*[torch.from_numpy(x) for x in inputs])
    for value, out in zip(block.outputs, outs):
        expected = values[value.name]
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))

    # the layer learns its rounding; the causal mask has no sample axis and is passed whole
    module.quantized = True
    shared = [v.producer() is not None and v.producer().op_type == "Trilu" for v in block.inputs]
    assert sum(shared) == 1
    report = learn_rounding(module, inputs, config=LearnConfig(method="flexround", iterations=60, batch_size=4),
                            shared=shared)
    assert report.mse_learned < 0.9 * report.mse_nearest, report


def test_outputs_that_are_not_per_sample_floats_are_left_out_of_the_loss():
    """A layer hands a shape scalar to later layers (as BERT exports do): the scalar is a block output but
    not something rounding can move, so learning compares the float outputs only."""
    proto = mlp_block()
    proto.graph.node.extend([node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["n"], axis=0)])
    proto.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    proto.graph.output.append(helper.make_tensor_value_info("n", I64, []))
    x = np.random.default_rng(7).normal(size=(96, 16)).astype(np.float32)
    model = ir.from_proto(proto)
    block = block_from_nodes(model.graph, list(model.graph))
    assert any(v.name == "n" for v in block.outputs)
    module = BlockModule(block, weight_points(proto, 4), model=model)
    report = learn_rounding(module, [x], config=LearnConfig(method="flexround", iterations=100, batch_size=32))
    assert report.mse_learned < report.mse_nearest

    only_scalar = ir.from_proto(make_model([node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["n"], axis=0),
                                            node("MatMul", ["x", "w"], ["m"]), node("Shape", ["m"], ["s2"]),
                                            node("Gather", ["s2", "zero"], ["y"], axis=0)],
                                           {"x": np.zeros((1, 16), np.float32)},
                                           {"zero": np.array(0, np.int64), "w": np.ones((16, 4), np.float32)}, ["n", "y"],
                                           batch=True))
    block = block_from_nodes(only_scalar.graph, list(only_scalar.graph))
    with pytest.raises(NothingToLearn):
        learn_rounding(BlockModule(block, weight_points(ir.to_proto(only_scalar), 4), model=only_scalar), [x],
                       config=LearnConfig(iterations=5))


def test_a_block_whose_inputs_are_all_shared_has_nothing_to_learn():
    """Only tables every sample shares (no per-sample input): there are no samples to fit."""
    proto = mlp_block()
    model = ir.from_proto(proto)
    module = BlockModule(block_from_nodes(model.graph, list(model.graph)), weight_points(proto, 4), model=model)
    with pytest.raises(NothingToLearn, match="shared"):
        learn_rounding(module, [np.ones((3, 16), np.float32)], shared=[True], config=LearnConfig(iterations=5))
