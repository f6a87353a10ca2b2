"""Models for the scaling benchmark (scripts/bench_scale.py): a real model made deeper by repeating its
decoder layers, and a LLaMA-shaped model of any size with random weights, built directly in ONNX.

`repeat_layers(model, times)` finds the decoder layers of an exported model by their node names
(`/model/layers.<i>/...`, the naming of the TorchScript exporter), and appends `times - 1` further copies
of the whole stack, each copy with its own weights (copied arrays), reading the residual stream that the
previous layer wrote. Tensors computed outside the layers (attention mask, rotary tables) are shared.

`random_llama(...)` writes the graph an eager LLaMA export has (decomposed RMSNorm, Q/K/V/O MatMuls,
rotary embedding by rotate-half, additive causal and padding mask, Softmax, SwiGLU MLP, tied-free LM
head) with weights drawn from N(0, 0.02²), so onnxq's structure recognition sees a transformer. Neither
needs torch; both return onnx_ir models, saved with external data by `save_external`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

LAYER_NAME = re.compile(r"/model/layers\.(\d+)/")


# ------------------------------------------------------------------------------------------------
# repeat the decoder layers of an exported model


def repeat_layers(model: ir.Model, times: int) -> ir.Model:
    """`model` (edited in place and returned) with its decoder stack run `times` times in a row."""
    if times < 1:
        raise ValueError("times must be at least 1")
    graph = model.graph
    layers: dict[int, list[ir.Node]] = {}
    for node in graph:
        match = LAYER_NAME.search(node.name or "")
        if match:
            layers.setdefault(int(match.group(1)), []).append(node)
    if len(layers) < 2:
        raise ValueError("no decoder layers found by name (/model/layers.<i>/): need at least two")
    order = sorted(layers)
    last = order[-1]
    stream_in = {i: _stream_input(layers, i, order) for i in order}
    stream_out = {i: _stream_output(layers[i]) for i in order}  # before any copy reads them
    out_last = stream_out[last]
    readers_after = list(out_last.uses())  # final norm etc., to be re-pointed at the deepest copy
    stream = out_last
    anchor = layers[last][-1]
    for rep in range(1, times):
        for i in order:
            mapping = {stream_in[i]: stream}
            copies = _copy_nodes(graph, layers[i], mapping, f"__r{rep}")
            graph.insert_after(anchor, copies)
            anchor = copies[-1]
            stream = mapping[stream_out[i]]
    for node, index in readers_after:
        if stream is not out_last:
            node.replace_input_with(index, stream)
    return model


def _stream_output(nodes: list[ir.Node]) -> ir.Value:
    """The residual stream a layer writes: of its tensors read outside it, the one no layer beyond the
    next reads (an exporter may compute rotary tables in the first layer and let every later one read them)."""
    inside = set(nodes)
    here = _layer_of(nodes[0])
    outs = []
    for node in nodes:
        for value in node.outputs:
            outside = {_layer_of(user) for user, _ in value.uses() if user not in inside}
            if outside and outside <= {here + 1, None} or value.is_graph_output():
                outs.append(value)
    if len(outs) != 1:
        raise ValueError(f"a decoder layer should write one residual stream read by the next, found {len(outs)}")
    return outs[0]


def _layer_of(node: ir.Node) -> int | None:
    match = LAYER_NAME.search(node.name or "")
    return int(match.group(1)) if match else None


def _stream_input(layers: dict[int, list[ir.Node]], i: int, order: list[int]) -> ir.Value:
    """The residual stream a layer reads: the previous layer's output; for the first layer, the input at
    the same place as in the second layer."""
    if i != order[0]:
        return _stream_output(layers[order[order.index(i) - 1]])
    second = order[1]
    previous = _stream_output(layers[i])
    by_role = {LAYER_NAME.sub("/", n.name): n for n in layers[i]}
    for node in layers[second]:
        for index, value in enumerate(node.inputs):
            if value is previous:
                return by_role[LAYER_NAME.sub("/", node.name)].inputs[index]
    raise ValueError("could not find where the first decoder layer reads the residual stream")


def _copy_nodes(graph: ir.Graph, nodes: list[ir.Node], mapping: dict[ir.Value, ir.Value], suffix: str) -> list[ir.Node]:
    """Copies of `nodes` (reading copies of what they compute and of their own weights); `mapping` gains
    every copied value."""
    inside = set(nodes)
    copies = []
    for node in nodes:
        inputs = []
        for value in node.inputs:
            if value is None or value in mapping:
                inputs.append(mapping.get(value) if value is not None else None)
                continue
            if value.is_initializer() and all(user in inside for user, _ in value.uses()):
                tensor = ir.tensor(value.const_value.numpy().copy(), name=value.name + suffix)
                copy = ir.Value(name=value.name + suffix, shape=value.shape, type=value.type, const_value=tensor)
                graph.register_initializer(copy)
                mapping[value] = copy
                inputs.append(copy)
            else:
                inputs.append(value)  # shared: computed outside the layer, or a constant other layers read too
        clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=(node.name or "") + suffix, overload=node.overload)
        for old, new in zip(node.outputs, clone.outputs):
            new.name = old.name + suffix if old.name else None
            new.type, new.shape = old.type, old.shape
            mapping[old] = new
        copies.append(clone)
    return copies


def save_external(model: ir.Model, path: str | Path) -> Path:
    """Save with every weight in one external-data file next to the model (<name>.data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=path.name + ".data")
    return path


# ------------------------------------------------------------------------------------------------
# a LLaMA-shaped model with random weights


class _Builder:
    def __init__(self, seed: int):
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def const(self, name: str, array) -> ir.Value:
        array = np.asarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.initializers.append(value)
        return value

    def weight(self, name: str, shape: tuple[int, ...]) -> ir.Value:
        return self.const(name, (self.rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32))

    def op(self, op_type: str, inputs: list, name: str, num_outputs: int = 1, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, name=name, num_outputs=num_outputs)
        for k, out in enumerate(node.outputs):
            out.name = f"{name}_output_{k}"
        self.nodes.append(node)
        return node.outputs[0]


def random_llama(*, hidden: int, intermediate: int, layers: int, heads: int, vocab: int = 32000,
                 max_seq: int = 2048, seed: int = 0) -> ir.Model:
    """A LLaMA-shaped ONNX model (inputs input_ids and attention_mask, batch × sequence int64; output
    logits) with random weights; parameters ≈ 2·vocab·hidden + layers·(4·hidden² + 3·hidden·intermediate)."""
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError("hidden must split into heads of an even size")
    head_dim = hidden // heads
    b = _Builder(seed)
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    i64 = lambda name, v: b.const(name, np.asarray(v, dtype=np.int64))
    f32 = lambda name, v: b.const(name, np.asarray(v, dtype=np.float32))
    zero, seq_axis = i64("zero", [0]), i64("seq_axis", [1])

    x = b.op("Gather", [b.weight("model.embed_tokens.weight", (vocab, hidden)), ids], "/model/embed_tokens/Gather")
    # sequence length, rotary tables and the additive mask: computed once, read by every layer
    seq = b.op("Slice", [b.op("Shape", [ids], "/model/Shape"), seq_axis, i64("two_i", [2]), zero], "/model/seq_len")
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(max_seq), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    cos = b.op("Slice", [f32("model.rotary_cos", np.cos(angles)), zero, seq, zero], "/model/rotary_emb/cos")
    sin = b.op("Slice", [f32("model.rotary_sin", np.sin(angles)), zero, seq, zero], "/model/rotary_emb/sin")
    neg = np.float32(np.finfo(np.float32).min)
    causal = np.triu(np.full((max_seq, max_seq), neg, dtype=np.float32), k=1)
    causal = b.op("Slice", [b.op("Slice", [f32("model.causal_mask", causal), zero, seq, zero], "/model/causal_rows"),
                            zero, seq, seq_axis], "/model/causal")
    padding = b.op("Mul", [b.op("Sub", [f32("one_f", 1.0), b.op("Cast", [mask], "/model/mask_cast", to=ir.DataType.FLOAT)],
                                "/model/mask_inv"), f32("mask_min", neg)], "/model/mask_add")
    padding = b.op("Unsqueeze", [padding, i64("mask_axes", [1, 2])], "/model/mask_unsqueeze")
    additive = b.op("Add", [causal, padding], "/model/mask")

    heads_shape = i64("heads_shape", [0, 0, heads, head_dim])
    merge_shape = i64("merge_shape", [0, 0, hidden])
    half = head_dim // 2

    def rms(x, prefix, gamma_name):
        sq = b.op("Pow", [x, f32(f"{prefix}/two", 2.0)], f"{prefix}/Pow")
        mean = b.op("ReduceMean", [sq, i64(f"{prefix}/axes", [-1])], f"{prefix}/ReduceMean", keepdims=1)
        den = b.op("Sqrt", [b.op("Add", [mean, f32(f"{prefix}/eps", 1e-5)], f"{prefix}/Add")], f"{prefix}/Sqrt")
        normed = b.op("Mul", [x, b.op("Div", [f32(f"{prefix}/one", 1.0), den], f"{prefix}/Div")], f"{prefix}/Mul")
        gamma = f32(gamma_name, 1.0 + 0.1 * b.rng.standard_normal(hidden).astype(np.float32))
        return b.op("Mul", [gamma, normed], f"{prefix}/Mul_1")

    def rope(t, prefix):
        lo = b.op("Slice", [t, i64(f"{prefix}/lo_s", [0]), i64(f"{prefix}/lo_e", [half]), i64(f"{prefix}/ax", [-1])], f"{prefix}/Slice")
        hi = b.op("Slice", [t, i64(f"{prefix}/hi_s", [half]), i64(f"{prefix}/hi_e", [head_dim]), i64(f"{prefix}/ax1", [-1])], f"{prefix}/Slice_1")
        rotated = b.op("Concat", [b.op("Neg", [hi], f"{prefix}/Neg"), lo], f"{prefix}/Concat", axis=-1)
        return b.op("Add", [b.op("Mul", [t, cos], f"{prefix}/Mul"), b.op("Mul", [rotated, sin], f"{prefix}/Mul_1")], f"{prefix}/Add")

    for i in range(layers):
        p = f"/model/layers.{i}"
        w = f"model.layers.{i}"
        h = rms(x, f"{p}/input_layernorm", f"{w}.input_layernorm.weight")

        def heads_of(name, t, p=p):
            r = b.op("Reshape", [t, heads_shape], f"{p}/self_attn/{name}_Reshape")
            return b.op("Transpose", [r], f"{p}/self_attn/{name}_Transpose", perm=[0, 2, 1, 3])

        q = heads_of("q", b.op("MatMul", [h, b.weight(f"{w}.self_attn.q_proj.weight", (hidden, hidden))], f"{p}/self_attn/q_proj/MatMul"))
        k = heads_of("k", b.op("MatMul", [h, b.weight(f"{w}.self_attn.k_proj.weight", (hidden, hidden))], f"{p}/self_attn/k_proj/MatMul"))
        v = heads_of("v", b.op("MatMul", [h, b.weight(f"{w}.self_attn.v_proj.weight", (hidden, hidden))], f"{p}/self_attn/v_proj/MatMul"))
        q, k = rope(q, f"{p}/self_attn/rope_q"), rope(k, f"{p}/self_attn/rope_k")
        kt = b.op("Transpose", [k], f"{p}/self_attn/Transpose_k", perm=[0, 1, 3, 2])
        scores = b.op("Mul", [b.op("MatMul", [q, kt], f"{p}/self_attn/MatMul"), f32(f"{p}/scale", 1.0 / np.sqrt(head_dim))],
                      f"{p}/self_attn/Mul")
        probs = b.op("Softmax", [b.op("Add", [scores, additive], f"{p}/self_attn/Add")], f"{p}/self_attn/Softmax", axis=-1)
        ctx = b.op("MatMul", [probs, v], f"{p}/self_attn/MatMul_1")
        ctx = b.op("Reshape", [b.op("Transpose", [ctx], f"{p}/self_attn/Transpose_o", perm=[0, 2, 1, 3]), merge_shape],
                   f"{p}/self_attn/Reshape_o")
        o = b.op("MatMul", [ctx, b.weight(f"{w}.self_attn.o_proj.weight", (hidden, hidden))], f"{p}/self_attn/o_proj/MatMul")
        x = b.op("Add", [x, o], f"{p}/Add")
        h = rms(x, f"{p}/post_attention_layernorm", f"{w}.post_attention_layernorm.weight")
        gate = b.op("MatMul", [h, b.weight(f"{w}.mlp.gate_proj.weight", (hidden, intermediate))], f"{p}/mlp/gate_proj/MatMul")
        up = b.op("MatMul", [h, b.weight(f"{w}.mlp.up_proj.weight", (hidden, intermediate))], f"{p}/mlp/up_proj/MatMul")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        down = b.op("MatMul", [b.op("Mul", [act, up], f"{p}/mlp/Mul"),
                               b.weight(f"{w}.mlp.down_proj.weight", (intermediate, hidden))], f"{p}/mlp/down_proj/MatMul")
        x = b.op("Add", [x, down], f"{p}/Add_1")
    h = rms(x, "/model/norm", "model.norm.weight")
    logits = b.op("MatMul", [h, b.weight("lm_head.weight", (hidden, vocab))], "/lm_head/MatMul")
    logits.name = "logits"
    logits.dtype, logits.shape = ir.DataType.FLOAT, ir.Shape(["batch", "sequence", vocab])
    graph = ir.Graph([ids, mask], [logits], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 18},
                     name="random_llama")
    return ir.Model(graph, ir_version=8, producer_name="onnxq bench_scale")


def llama_parameters(hidden: int, intermediate: int, layers: int, vocab: int = 32000) -> int:
    """Weights of random_llama (norm γ included)."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden
