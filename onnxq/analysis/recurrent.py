"""Recurrent LM blocks: Mamba mixers and RWKV time/channel mixing, found by pattern, never by names.

Mamba mixer (`MambaMixer`): two linear layers read the same tensor, the states `in_x` and the gate
`in_z`; in_x's output reaches (through Transposes) a depthwise Conv (group = channels), the causal
conv1d; the output projection `out_proj` reads y ⊙ SiLU(z), where SiLU(z) = z·Sigmoid(z) of in_z's
output and y (the selective scan's output) is not itself a linear layer's output (that would be a
SwiGLU MLP), and at least one activation×activation MatMul (the scan's C·Bᵀ and decay-weighted sum)
lies between the conv and the gate (a gated conv without a scan is not a Mamba mixer). SiLU(z) is
z·σ(z), or z·σ(s ⊙ z) for a constant vector s (the S-SiLU that smooth_fused_rotate leaves), and the
mixer is only recorded when z, SiLU(z) and the gated product have no readers besides the mixer's
own (smoothing rescales them: another reader would see the rescaled tensor).

RWKV (`RWKVMix`): a linear layer whose input is a token-shift mix x·μ + x_prev·μ' (two Muls by
constant per-channel vectors added together, x_prev a shifted copy of x), one per key / value /
receptance. Time mixing: the output linear reads σ(receptance) ⊙ wkv. Channel mixing: σ(receptance)
⊙ value(relu(key)²) is the block's output. The μ vectors (element-wise weights) are listed with the
activation each multiplies, which is what RWKVQuant's codebook fitting weights them by.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.analysis.matching import Rejection, data_readers, sole_reader, vector_const
from onnxq.analysis.mlp import silu_input
from onnxq.ir.graph import attr, traced_const
from onnxq.ir.linear import Linear


@dataclass(eq=False)
class MambaMixer:
    in_x: Linear
    in_z: Linear
    conv: ir.Node  # the depthwise causal conv1d
    gate: ir.Node  # Mul(y, SiLU(z)), read by out_proj
    z_sigmoid: ir.Node  # the Sigmoid of SiLU(z) = z·Sigmoid(z)
    z_silu: ir.Node  # the Mul of SiLU(z)
    ssilu_scale: ir.Node | None  # Mul(z, s) inside the Sigmoid once smooth_fused_rotate has run
    out_proj: Linear
    scan_matmuls: list[ir.Node] = field(default_factory=list)  # activation×activation MatMuls of the scan
    inner_linears: list[Linear] = field(default_factory=list)  # x_proj (B, C) and dt_proj, read after the conv

    @property
    def name(self) -> str:
        return self.out_proj.name


@dataclass(eq=False)
class Mix:
    """x·μ + x_prev·μ' feeding one linear layer: the two Muls and their constant vectors' input slots."""

    add: ir.Node
    muls: list[tuple[ir.Node, int]]  # (Mul, index of its constant vector input)

    @property
    def source(self) -> frozenset[ir.Value]:
        """The activations mixed (x and x_prev): the same for every mix of one block."""
        return frozenset(mul.inputs[1 - slot] for mul, slot in self.muls)


@dataclass(eq=False)
class RWKVMix:
    kind: str  # "time" | "channel"
    key: Linear
    value: Linear
    receptance: Linear
    output: Linear | None  # time mixing's output projection; channel mixing has none
    mixes: list[Mix] = field(default_factory=list)

    @property
    def linears(self) -> list[Linear]:
        return [lin for lin in (self.key, self.value, self.receptance, self.output) if lin is not None]


def find_mamba_mixers(linears: list[Linear], rejected: list[Rejection]) -> list[MambaMixer]:
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    out = []
    for out_proj in linears:
        gate = out_proj.input.producer()
        if gate is None or gate.op_type != "Mul" or len(gate.inputs) != 2:
            continue
        for y, s in ((gate.inputs[0], gate.inputs[1]), (gate.inputs[1], gate.inputs[0])):
            silu = _gate_silu(s)
            if silu is None or silu[0] not in by_output or y in by_output:
                continue
            in_z = by_output[silu[0]]
            siblings = [lin for lin in by_input.get(in_z.input, []) if lin is not in_z]
            found = [(lin, conv) for lin in siblings if (conv := _depthwise_conv_after(lin.output)) is not None]
            where = gate.name or ""
            if len(found) != 1:
                rejected.append(Rejection("Mamba mixer", where, "the gate's SiLU(z) linear has no sibling linear "
                                          "feeding a depthwise Conv (the states' conv1d)"))
                break
            in_x, conv = found[0]
            between = _between(conv.outputs[0], gate)
            linear_nodes = {lin.node for lin in linears}
            scan = [n for n in between if n.op_type == "MatMul" and n not in linear_nodes]
            why = _private_gate_problem(in_z, silu[1], gate)
            if not scan:
                why = "no activation×activation MatMul (selective scan) between the conv1d and the gate"
            if why:
                rejected.append(Rejection("Mamba mixer", where, why))
                break
            sigmoid, product, scale = silu[1]
            out.append(MambaMixer(in_x, in_z, conv, gate, sigmoid, product, scale, out_proj, scan,
                                  [lin for lin in linears if lin.node in between]))
            break
    return out


def _gate_silu(value: ir.Value) -> tuple[ir.Value, tuple[ir.Node, ir.Node, ir.Node | None]] | None:
    """(z, (Sigmoid, Mul, scale Mul or None)) when value = z·σ(z) or the S-SiLU z·σ(s ⊙ z)."""
    plain = silu_input(value)
    if plain is not None and len(plain[1]) == 2:
        return plain[0], (plain[1][0], plain[1][1], None)
    product = value.producer()
    if product is None or product.op_type != "Mul" or len(product.inputs) != 2:
        return None
    for z, other in ((product.inputs[0], product.inputs[1]), (product.inputs[1], product.inputs[0])):
        sigmoid = other.producer()
        scale = sigmoid.inputs[0].producer() if sigmoid is not None and sigmoid.op_type == "Sigmoid" else None
        if scale is not None and scale.op_type == "Mul" and z in scale.inputs and any(
                vector_const(v) is not None for v in scale.inputs if v is not z):
            return z, (sigmoid, product, scale)
    return None


def _private_gate_problem(in_z: Linear, silu: tuple[ir.Node, ir.Node, ir.Node | None], gate: ir.Node) -> str | None:
    """Why smoothing z would change a tensor someone else reads, or None."""
    sigmoid, product, scale = silu
    z_readers = {node for node, _ in data_readers(in_z.output)}
    if z_readers - {sigmoid, product, scale} or in_z.output.is_graph_output():
        return "in_z's output z has readers besides SiLU(z)"
    if sole_reader(product.outputs[0]) is not gate:
        return "SiLU(z) has readers besides the gate"
    if sole_reader(gate.outputs[0]) is None:
        return "the gated product has readers besides out_proj"
    return None


def _depthwise_conv_after(value: ir.Value, depth: int = 3) -> ir.Node | None:
    for _ in range(depth):
        readers = data_readers(value)
        if len(readers) != 1:
            return None
        node = readers[0][0]
        if node.op_type == "Conv":  # depthwise: one input channel per group, as many groups as channels
            weight = node.inputs[1]
            shape = weight.shape if weight is not None else None
            ok = shape is not None and len(shape) >= 2 and shape[1] == 1 and attr(node, "group", 1) == shape[0]
            return node if ok else None
        if node.op_type not in ("Transpose", "Reshape", "Unsqueeze"):
            return None
        value = node.outputs[0]
    return None


def _between(start: ir.Value, end: ir.Node) -> set[ir.Node]:
    """Nodes on a path from `start`'s readers to `end` (both reached forwards and backwards)."""
    forward, stack = set(), [start]
    while stack:
        for user, _ in data_readers(stack.pop()):
            if user not in forward and user is not end:
                forward.add(user)
                stack.extend(user.outputs)
    backward, stack = set(), [v for v in end.inputs if v is not None]
    while stack:
        node = stack.pop().producer()
        if node is not None and node not in backward and node in forward:
            backward.add(node)
            stack.extend(v for v in node.inputs if v is not None)
    return backward


def find_rwkv_mixes(linears: list[Linear], rejected: list[Rejection]) -> list[RWKVMix]:
    by_output = {lin.output: lin for lin in linears}
    mix_of: dict[ir.Value, Mix | None] = {}  # one Mix per Add: an exporter may share one mix between linears
    for lin in linears:
        if lin.input not in mix_of:
            mix_of[lin.input] = _token_mix(lin.input)
    mixed = {lin: mix_of[lin.input] for lin in linears if mix_of[lin.input] is not None}
    out = []
    for receptance, r_mix in mixed.items():
        sigmoid = _sole_reader_of(receptance.output, "Sigmoid")
        product = _sole_reader_of(sigmoid.outputs[0], "Mul") if sigmoid is not None else None
        if product is None:
            continue
        other = product.inputs[1] if product.inputs[0] is sigmoid.outputs[0] else product.inputs[0]
        readers = data_readers(product.outputs[0])
        output = next((lin for lin in linears if len(readers) == 1 and lin.node is readers[0][0]), None)
        if other in by_output and by_output[other] not in mixed:  # channel mixing: σ(r) ⊙ value(relu(key)²)
            value = by_output[other]
            key = next((k for k, mix in mixed.items() if mix.source == r_mix.source and _squared_relu_of(value.input, k)),
                       None)
            if key is None:
                rejected.append(Rejection("RWKV channel mix", product.name or "", "value does not read relu(key)²"))
                continue
            out.append(RWKVMix("channel", key, value, receptance, None, list(dict.fromkeys([r_mix, mixed[key]]))))
        elif output is not None:  # time mixing: output(σ(r) ⊙ wkv(key, value))
            kv = [lin for lin, mix in mixed.items() if lin is not receptance and mix.source == r_mix.source
                  and _reaches(lin.output, product)]
            key, value = _key_and_value(kv)
            if key is None:
                rejected.append(Rejection("RWKV time mix", product.name or "", "no key/value linears with token-shift "
                                          "mixes reach the wkv product"))
                continue
            out.append(RWKVMix("time", key, value, receptance, output, list(dict.fromkeys([r_mix, mixed[key], mixed[value]]))))
    return out


def _token_mix(value: ir.Value) -> Mix | None:
    """x·μ + x_prev·μ' (either order, μ constant per-channel vectors)."""
    add = value.producer()
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    muls = []
    for term in add.inputs:
        mul = term.producer()
        if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
            return None
        slot = next((i for i in (0, 1) if vector_const(mul.inputs[i]) is not None), None)
        if slot is None:
            return None
        muls.append((mul, slot))
    return Mix(add, muls)


def _sole_reader_of(value: ir.Value, op_type: str) -> ir.Node | None:
    reader = sole_reader(value)
    return reader if reader is not None and reader.op_type == op_type else None


def _squared_relu_of(value: ir.Value, key: Linear) -> bool:
    """value = relu(key output)² as Pow(·, 2) or Mul(r, r)."""
    p = value.producer()
    if p is None:
        return False
    relu = p.inputs[0].producer() if p.inputs[0] is not None else None
    exponent = traced_const(p.inputs[1]) if p.op_type == "Pow" else None
    square = (exponent is not None and exponent.size == 1 and float(exponent.ravel()[0]) == 2.0) \
        or (p.op_type == "Mul" and p.inputs[0] is p.inputs[1])
    return square and relu is not None and relu.op_type == "Relu" and relu.inputs[0] is key.output


def _reaches(value: ir.Value, target: ir.Node, limit: int = 200) -> bool:
    seen, stack = set(), [value]
    while stack and len(seen) < limit:
        for user, _ in data_readers(stack.pop()):
            if user is target:
                return True
            if user not in seen:
                seen.add(user)
                stack.extend(user.outputs)
    return False


def _key_and_value(kv: list[Linear]) -> tuple[Linear | None, Linear | None]:
    """The key feeds the Softmax's logits; the value multiplies the softmax weights."""
    if len(kv) != 2:
        return None, None
    a, b = kv
    first = _first_reader_op(a.output)
    return (a, b) if first != "Mul" else (b, a)


def _first_reader_op(value: ir.Value) -> str | None:
    for _ in range(3):
        readers = data_readers(value)
        if len(readers) != 1:
            return None
        node = readers[0][0]
        if node.op_type not in ("Unsqueeze", "Reshape", "Transpose"):
            return node.op_type
        value = node.outputs[0]
    return None
