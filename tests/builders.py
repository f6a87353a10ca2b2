"""Small ONNX models built in the tests, with onnx.helper, so tests need no files and no torch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # what ONNX Runtime 1.2x reads; onnx.helper would write the newest


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def conv_weights(rng, cout: int, cin: int, k: int, group: int = 1, *, spread: float = 1.0) -> np.ndarray:
    """Conv weights whose output channels have very different ranges (what equalisation fixes)."""
    w = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32) * 0.3
    return w * np.exp(rng.uniform(-spread, spread, size=(cout, 1, 1, 1))).astype(np.float32)


def mobilenet_block_model(*, batch: int | str = "N", channels: int = 8, opset: int = 13, weights_as_constants: bool = False,
                          relu6: bool = True, seed: int = 0) -> onnx.ModelProto:
    """stem Conv+BN+ReLU6 → [pw Conv+BN+ReLU6 → dw Conv+BN+ReLU6 → pw Conv+BN] + residual → GAP → Gemm.

    The shape of a MobileNetV2 inverted-residual block, small enough to run in milliseconds.
    """
    c, e = channels, channels * 4
    nodes, inits = [], []
    rng = np.random.default_rng(seed)

    def conv_bn(name, x, cout, cin, k, group=1, act=True):
        w = conv_weights(rng, cout, cin, k, group, spread=2.0)
        inits.extend([_init(f"{name}.weight", w),
                      _init(f"{name}.bn.scale", rng.uniform(0.5, 2, cout).astype(np.float32)),
                      _init(f"{name}.bn.bias", rng.normal(size=cout).astype(np.float32) * 0.5),
                      _init(f"{name}.bn.mean", rng.normal(size=cout).astype(np.float32) * 0.5),
                      _init(f"{name}.bn.var", rng.uniform(0.5, 2, cout).astype(np.float32))])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [f"{name}.conv"], name=f"{name}/Conv",
                                      pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", f"{name}.bn.scale", f"{name}.bn.bias",
                                                             f"{name}.bn.mean", f"{name}.bn.var"], [f"{name}.bn"],
                                      name=f"{name}/BatchNormalization"))
        if not act:
            return f"{name}.bn"
        if relu6:
            inits.extend([_init(f"{name}.min", np.array(0, np.float32)), _init(f"{name}.max", np.array(6, np.float32))])
            nodes.append(helper.make_node("Clip", [f"{name}.bn", f"{name}.min", f"{name}.max"], [f"{name}.act"],
                                          name=f"{name}/Clip"))
        else:
            nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.act"], name=f"{name}/Relu"))
        return f"{name}.act"

    x = conv_bn("stem", "input", c, 3, 3)
    y = conv_bn("expand", x, e, c, 1)
    y = conv_bn("depthwise", y, e, e, 3, group=e)
    y = conv_bn("project", y, c, e, 1, act=False)
    nodes.append(helper.make_node("Add", [x, y], ["block.out"], name="block/Add"))
    nodes.append(helper.make_node("GlobalAveragePool", ["block.out"], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    inits.extend([_init("fc.weight", rng.normal(size=(10, c)).astype(np.float32) * 0.5),
                  _init("fc.bias", rng.normal(size=10).astype(np.float32) * 0.1)])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc/Gemm", transB=1))
    graph = helper.make_graph(nodes, "mobilenet_block",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    return constants_from_initializers(model) if weights_as_constants else model


def constants_from_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node, as PP-OCR's exported models store weights."""
    consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}/Constant", value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    return model


def attention_model(*, seq: int = 8, hidden: int = 16, heads: int = 2, opset: int = 17,
                    mask_value: float = float(np.finfo(np.float32).min), seed: int = 0) -> onnx.ModelProto:
    """A BERT-style self-attention layer with an additive attention mask built from an int64 input."""
    rng = np.random.default_rng(seed)
    d = hidden // heads
    nodes, inits = [], []

    def linear(name, x, out):
        inits.extend([_init(f"{name}.weight", (rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)),
                      _init(f"{name}.bias", rng.normal(size=hidden).astype(np.float32) * 0.1)])
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.mm"], name=f"{name}/MatMul"))
        nodes.append(helper.make_node("Add", [f"{name}.bias", f"{name}.mm"], [out], name=f"{name}/Add"))

    inits.append(_init("heads_shape", np.array([0, 0, heads, d], np.int64)))
    inits.append(_init("merge_shape", np.array([0, 0, hidden], np.int64)))
    for name in ("query", "key", "value"):
        linear(name, "hidden", f"{name}.out")
        nodes.append(helper.make_node("Reshape", [f"{name}.out", "heads_shape"], [f"{name}.heads"], name=f"{name}/Reshape"))
        perm = [0, 2, 3, 1] if name == "key" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [f"{name}.heads"], [f"{name}.t"], name=f"{name}/Transpose", perm=perm))
    nodes.append(helper.make_node("MatMul", ["query.t", "key.t"], ["scores"], name="scores/MatMul"))
    inits.append(_init("sqrt_d", np.array(np.sqrt(d), np.float32)))
    nodes.append(helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"], name="scores/Div"))
    # mask: (1 - mask) * finfo.min, broadcast over heads and queries (what HF exports)
    inits.extend([_init("mask_axes", np.array([1, 2], np.int64)), _init("one", np.array(1.0, np.float32)),
                  _init("mask_min", np.array(mask_value, np.float32))])
    nodes += [helper.make_node("Unsqueeze", ["attention_mask", "mask_axes"], ["mask4"], name="mask/Unsqueeze"),
              helper.make_node("Cast", ["mask4"], ["maskf"], name="mask/Cast", to=TensorProto.FLOAT),
              helper.make_node("Sub", ["one", "maskf"], ["inverted"], name="mask/Sub"),
              helper.make_node("Mul", ["inverted", "mask_min"], ["additive_mask"], name="mask/Mul"),
              helper.make_node("Add", ["scaled", "additive_mask"], ["masked"], name="scores/Add"),
              helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "value.t"], ["context.heads"], name="context/MatMul"),
              helper.make_node("Transpose", ["context.heads"], ["context.t"], name="context/Transpose", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context.t", "merge_shape"], ["context"], name="context/Reshape")]
    linear("output", "context", "attn.out")
    nodes.append(helper.make_node("Add", ["hidden", "attn.out"], ["residual"], name="residual/Add"))
    inits.extend([_init("ln.scale", np.ones(hidden, np.float32)), _init("ln.bias", np.zeros(hidden, np.float32))])
    nodes.append(helper.make_node("LayerNormalization", ["residual", "ln.scale", "ln.bias"], ["out"], name="ln", axis=-1))
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", seq, hidden]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", seq, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def concat_model() -> onnx.ModelProto:
    """Convs of very different output ranges concatenated and read by another conv; `b` is also read
    by a conv of its own, so it is quantized for two reasons and must share the Concat's scale."""
    rng = np.random.default_rng(0)
    inits = [_init("a.weight", conv_weights(rng, 4, 3, 1) * 5), _init("b.weight", conv_weights(rng, 4, 3, 1) * 0.2),
             _init("c.weight", conv_weights(rng, 6, 8, 1)), _init("d.weight", conv_weights(rng, 6, 4, 1))]
    nodes = [helper.make_node("Conv", ["input", "a.weight"], ["a"], name="a/Conv"),
             helper.make_node("Conv", ["input", "b.weight"], ["b"], name="b/Conv"),
             helper.make_node("Relu", ["a"], ["a_relu"], name="a/Relu"),
             helper.make_node("Concat", ["a_relu", "b"], ["ab"], name="concat", axis=1),
             helper.make_node("Conv", ["ab", "c.weight"], ["c"], name="c/Conv"),
             helper.make_node("Conv", ["b", "d.weight"], ["d"], name="d/Conv"),
             helper.make_node("Add", ["c", "d"], ["out"], name="out/Add")]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def random_images(n: int, size: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def detector_and_classifier_model(seed: int = 5, channels: int = 8) -> onnx.ModelProto:
    """A stem Conv from the 3-channel input and a MaxPool after it, a residual block, then two heads: a
    DB-detector-like one (grouped ConvTranspose whose bias is an Add of its own, BN, an uneven
    per-channel scale, ReLU, ConvTranspose, a scalar gain, Sigmoid) and a classifier (a MaxPool after
    a Conv + ReLU beside one after the residual Add, their sum, GAP, Flatten, Gemm)."""
    rng = np.random.default_rng(seed)
    c = channels

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [init("c1.w", conv_weights(rng, c, 3, 3)), init("c1.b", rng.normal(size=c) * 0.1),
             init("c2.w", conv_weights(rng, c, c, 3)), init("c2.b", rng.normal(size=c) * 0.1),
             init("c3.w", conv_weights(rng, c, c, 1)), init("c3.b", rng.normal(size=c) * 0.1),
             init("up1.w", rng.normal(size=(c, c // 2, 2, 2)) * 0.3), init("up1.b", rng.normal(size=(c, 1, 1))),
             init("bn.scale", rng.uniform(0.5, 1.5, c)), init("bn.bias", rng.normal(size=c) * 0.1),
             init("bn.mean", rng.normal(size=c) * 0.2), init("bn.var", rng.uniform(0.5, 2.0, c)),
             init("head.scale", rng.uniform(0.3, 3.0, size=(c, 1, 1))),
             init("up2.w", rng.normal(size=(c, 1, 2, 2)) * 0.3), init("gain", [[[1.5]]]),
             init("fc.w", rng.normal(size=(10, c)) * 0.3), init("fc.b", rng.normal(size=10) * 0.1)]
    node = helper.make_node
    nodes = [node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="stem/Conv", pads=[1] * 4),
             node("Relu", ["c1"], ["r1"], name="stem/Relu"),
             node("MaxPool", ["r1"], ["p1"], name="stem/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], name="block/Conv", pads=[1] * 4),
             node("Relu", ["c2"], ["r2"], name="block/Relu"),
             node("Add", ["r2", "p1"], ["res"], name="block/Add"),
             node("ConvTranspose", ["res", "up1.w"], ["up1"], name="head/up1", strides=[2, 2], group=2),
             node("Add", ["up1", "up1.b"], ["up1.biased"], name="head/up1_bias"),
             node("BatchNormalization", ["up1.biased", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"],
                  name="head/BN"),
             node("Mul", ["bn", "head.scale"], ["bn.scaled"], name="head/scale"),
             node("Relu", ["bn.scaled"], ["bn.relu"], name="head/Relu"),
             node("ConvTranspose", ["bn.relu", "up2.w"], ["up2"], name="head/up2", strides=[2, 2]),
             node("Mul", ["up2", "gain"], ["up2.gain"], name="head/gain"),
             node("Sigmoid", ["up2.gain"], ["map"], name="head/Sigmoid"),
             node("Conv", ["res", "c3.w", "c3.b"], ["c3"], name="cls/Conv"),
             node("Relu", ["c3"], ["r3"], name="cls/Relu"),
             node("MaxPool", ["r3"], ["pa"], name="cls/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
             node("MaxPool", ["res"], ["pb"], name="res/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
             node("Add", ["pa", "pb"], ["pooled"], name="cls/Add"),
             node("GlobalAveragePool", ["pooled"], ["gap"], name="cls/GAP"),
             node("Flatten", ["gap"], ["flat"], name="cls/Flatten"),
             node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="cls/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "det_and_cls", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("map", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
