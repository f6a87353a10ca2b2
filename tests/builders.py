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
