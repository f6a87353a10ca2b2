"""Graph preparation for the ort-cpu target: rewrites that let ONNX Runtime fuse every Q/DQ group.

ORT's CPU provider replaces DQ→op→Q with an integer kernel only when *every* data input of the op
comes from a DequantizeLinear; a float constant operand (the 3 and 6 of hard-swish, the scale and
shift of an affine block after a Conv) leaves the op in float with a DQ before and a Q after it,
and it has no integer Div at all. Before the planner runs, `prepare` therefore

- folds Mul/Add by a per-output-channel constant that directly follows a Conv or ConvTranspose into
  its weights and bias (W' = c·W, b' = c·b for Mul; b' = b + c for Add);
- rewrites Div by a scalar constant as Mul by its reciprocal (QLinearMul exists, QLinearDiv not);
- gives a Conv/MatMul/Gemm that writes a model output an Identity to write it through, so that output
  is quantized too and ORT fuses the layer (the model output is then 8-bit; exclude the layer to keep
  it float);
- folds a chain of Mul/Add by scalar constants read only by Convs (as their data input) into those
  Convs, Conv(c·x + b) = (c·W)·x + b·ΣW where they do not pad; where they pad, only the scale goes into
  the weights and one Add of b/c stays (hard-swish's /6 and the learnable affine block after it);
- gives the remaining scalar constant operands of Add/Mul a DequantizeLinear of the activations' type
  that represents them exactly (UINT8: scale |c|/255, zero point 0 or 255; INT8: scale |c|/127, value
  ±127), so QLinearAdd/QLinearMul, whose inputs share one type, fire; attention-mask sized constants
  are left as they are, for the planner to recognise.

Each rewrite changes the float result by rounding only. The TensorRT target does not use this.
After planning, `drop_idle_qdq` takes back the Q/DQ pairs no integer kernel would use.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.ir.conv import CHANNEL_LAYERS, output_channels, per_channel, scale_output_channels
from onnxq.ir.graph import (
    Namer,
    add_initializer,
    const_array,
    is_const,
    mark_changed,
    only_consumer,
    swap_initializer,
    take_over_output,
)
from onnxq.quant.qdq import MASK_CONSTANT, Plan
from onnxq.quant.qdq_rules import ORT_INTEGER_KERNELS, ORT_INTEGER_PASSTHROUGH, is_index_input

_INT8_BINARY = ("Add", "Mul")
_FLOAT_DATA = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_IDLE_REASON = ("no integer kernel in ONNX Runtime reads or writes this op's tensors here: they stay float, "
                "without a Q/DQ pair that would only cost time")


def prepare(model: ir.Model, signed_activations: bool = False) -> dict[str, int]:
    """Apply the rewrites above in place (constant operands in INT8 when the activations are signed,
    UINT8 otherwise); how many of each were made."""
    graph, namer = model.graph, Namer(model.graph)
    counts = {"folded_into_conv": _fold_affine_into_conv(graph, namer),
              "div_to_mul": _div_by_scalar_to_mul(graph, namer)}
    counts["layer_outputs_given_a_reader"] = _read_layer_outputs(graph, namer)
    counts["folded_into_next_conv"] = _fold_scalar_affine_into_next_conv(graph, namer)
    counts["scalar_operands_quantized"] = _quantize_scalar_operands(graph, namer, signed_activations)
    graph.sort()
    return counts


def _standard_nodes(graph: ir.Graph, op_types: tuple[str, ...]) -> list[ir.Node]:
    """The graph's nodes of these ONNX-domain op types, listed up front so rewrites may edit the graph."""
    return [node for node in graph if node.op_type in op_types and node.domain in ("", "ai.onnx")]


def _float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _constant_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray, int] | None:
    """(data input, constant array, constant's index) for a binary op with one float constant input."""
    if len(node.inputs) != 2 or not all(_float32(v) for v in node.inputs):
        return None
    arrays = [const_array(v) for v in node.inputs]
    if (arrays[0] is None) == (arrays[1] is None):
        return None
    index = 0 if arrays[0] is not None else 1
    return node.inputs[1 - index], arrays[index], index


def _fold_affine_into_conv(graph: ir.Graph, namer: Namer) -> int:
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in _standard_nodes(graph, CHANNEL_LAYERS):
            weight = const_array(conv.inputs[1])
            bias = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
            if weight is None or (len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None):
                continue
            out = conv.outputs[0]
            user = only_consumer(out)
            operand = _constant_operand(user) if user is not None and user.op_type in _INT8_BINARY else None
            if operand is None:
                continue
            _, constant, _ = operand
            channels = output_channels(conv, weight)
            c = per_channel(constant, len(out.shape) if out.shape is not None else weight.ndim, channels)
            if c is None:
                continue
            bias = np.zeros(channels, np.float32) if bias is None else bias.astype(np.float32)
            if user.op_type == "Mul":
                weight = scale_output_channels(conv, weight, c)
                bias = bias * c
            else:
                bias = bias + c
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            swap_initializer(graph, namer, conv, 1, f"{conv.name}_weight_folded", weight.astype(np.float32))
            swap_initializer(graph, namer, conv, 2, f"{conv.name}_bias_folded", bias)
            result, user_constant = user.outputs[0], [v for v in user.inputs if v is not out]
            was_output, name = result.is_graph_output(), result.name
            ir.convenience.replace_all_uses_with(result, out, replace_graph_outputs=True)
            graph.remove(user, safe=True)
            for old in user_constant:
                _drop_if_unused(graph, old)
            if was_output:
                out.name = name
            else:
                mark_changed(out, "_affine", namer)
            folded += 1
            changed = True
    return folded


def _div_by_scalar_to_mul(graph: ir.Graph, namer: Namer) -> int:
    rewritten = 0
    for node in _standard_nodes(graph, ("Div",)):
        operand = _constant_operand(node)
        if operand is None or operand[2] != 1 or operand[1].size != 1 or not np.all(operand[1] != 0):
            continue
        divisor = node.inputs[1]
        reciprocal = (np.float32(1.0) / operand[1].astype(np.float32)).astype(np.float32)
        mul = ir.node("Mul", [node.inputs[0], add_initializer(graph, namer, f"{node.name}_reciprocal", reciprocal)],
                      name=namer.fresh(f"{node.name}_as_mul"))
        graph.insert_after(node, mul)
        result = node.outputs[0]
        mul.outputs[0].dtype, mul.outputs[0].shape = result.dtype, result.shape
        _replace_node(graph, namer, node, mul.outputs[0])
        _drop_if_unused(graph, divisor)
        rewritten += 1
    return rewritten


def _read_layer_outputs(graph: ir.Graph, namer: Namer) -> int:
    """A Conv/MatMul/Gemm whose output is a model output gets an Identity to write it: the planner
    quantizes a layer's output for its readers, and ORT leaves a layer without that Q in float,
    dequantizing its weights on every run (MobileNetV2's classifier: 0.34 ms of 3.6 ms; an LM head: the
    whole vocabulary matrix). The output is then 8-bit, per tensor. ORT removes the Identity."""
    given = 0
    for layer in _standard_nodes(graph, ("Conv", "MatMul", "Gemm")):
        out = layer.outputs[0]
        if not out.is_graph_output() or out.dtype not in _FLOAT_DATA:
            continue
        identity = ir.node("Identity", [out], name=namer.fresh(f"{layer.name}_output"))
        identity.outputs[0].dtype, identity.outputs[0].shape = out.dtype, out.shape
        graph.insert_after(layer, identity)
        take_over_output(out, identity.outputs[0], keep=identity)
        out.name = namer.fresh(f"{identity.outputs[0].name}_inner")
        given += 1
    return given


def _fold_scalar_affine_into_next_conv(graph: ir.Graph, namer: Namer) -> int:
    """A chain of Mul/Add by scalar constants read only by Convs (as their data input, weights constant),
    y = c·x + b, leaves the graph: Conv(c·x + b) = (c·W)·x + b·ΣW + bias where no Conv pads (ΣW per output
    channel, over its kernel); where one pads, the padding is zeros of y, not of x, so only the scale
    goes: Conv(c·x + b) = (c·W)·(x + b/c), one Add instead of the chain (hard-swish's /6 and a learnable
    affine block after it are three such ops on every feature map)."""
    folded = 0
    for conv in _standard_nodes(graph, ("Conv",)):
        chain = _scalar_chain(conv.inputs[0])
        readers = [user for user, _ in conv.inputs[0].uses()]
        if not chain or not all(_folds_into(user, conv.inputs[0]) for user in readers):
            continue
        if len(chain) == 1 and chain[0].op_type == "Add" and any(_pads(user) for user in readers):
            continue  # it would become the same Add (the shift this rewrite leaves before a padded Conv)
        c, b = np.float32(1.0), np.float32(0.0)
        for node in chain:  # head to tail
            k = np.float32(_constant_operand(node)[1].reshape(-1)[0])
            c, b = (c * k, b * k) if node.op_type == "Mul" else (c, b + k)
        if c == 0:
            continue
        data, padded = _constant_operand(chain[0])[0], any(_pads(user) for user in readers)
        if padded and b != 0:
            add = ir.node("Add", [data, add_initializer(graph, namer, f"{chain[-1].name}_shift",
                                                        np.array(b / c, np.float32))],
                          name=namer.fresh(f"{chain[-1].name}_shift"))
            add.outputs[0].name, add.outputs[0].dtype = namer.fresh(f"{data.name}_shifted"), ir.DataType.FLOAT
            add.outputs[0].shape = data.shape
            graph.insert_after(chain[-1], add)
            data = add.outputs[0]
        for user in readers:
            weight = const_array(user.inputs[1])
            if not padded and b != 0:
                bias = const_array(user.inputs[2]) if len(user.inputs) > 2 and user.inputs[2] is not None else None
                bias = (np.zeros(weight.shape[0], np.float32) if bias is None else bias.astype(np.float32))
                if len(user.inputs) < 3:
                    user.resize_inputs(3)
                swap_initializer(graph, namer, user, 2, f"{user.name}_bias_folded",
                                 bias + b * weight.reshape(weight.shape[0], -1).sum(axis=1))
            swap_initializer(graph, namer, user, 1, f"{user.name}_weight_folded", (weight * c).astype(np.float32))
            user.replace_input_with(0, data)
        for node in reversed(chain):
            constant = _constant_operand(node)[1:]
            operand = node.inputs[constant[1]]
            graph.remove(node, safe=True)
            _drop_if_unused(graph, operand)
        folded += 1
    return folded


def _scalar_chain(value: ir.Value) -> list[ir.Node]:
    """The Mul/Add-by-scalar-constant nodes that end in `value`, head first, each read only by the next."""
    chain: list[ir.Node] = []
    node = value.producer()
    while node is not None and node.op_type in _INT8_BINARY and node.domain in ("", "ai.onnx"):
        operand = _constant_operand(node)
        if operand is None or operand[1].size != 1 or (chain and only_consumer(node.outputs[0]) is not chain[0]):
            break
        data_shape = operand[0].shape
        if operand[1].ndim > 1 and (data_shape is None or operand[1].ndim > len(data_shape)):
            break  # a constant of higher rank broadcasts the data up: the Conv would read a lower rank
        chain.insert(0, node)
        node = operand[0].producer()
    return chain


def _folds_into(user: ir.Node, value: ir.Value) -> bool:
    return (user.op_type == "Conv" and user.domain in ("", "ai.onnx") and user.inputs[0] is value
            and value not in user.inputs[1:] and is_const(user.inputs[1])
            and not value.is_graph_output()
            and (len(user.inputs) < 3 or user.inputs[2] is None or is_const(user.inputs[2])))


def _pads(conv: ir.Node) -> bool:
    pads = conv.attributes.get_ints("pads", [])
    return any(pads) or conv.attributes.get_string("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")


def _quantize_scalar_operands(graph: ir.Graph, namer: Namer, signed: bool) -> int:
    quantized = 0
    for node in _standard_nodes(graph, _INT8_BINARY):
        operand = _constant_operand(node)
        if operand is None or operand[1].size != 1:
            continue
        _, constant, index = operand
        value = float(constant.reshape(-1)[0])
        if not np.isfinite(value) or abs(value) >= MASK_CONSTANT:  # attention-mask constants stay visible as such
            continue
        # exact: the constant sits at one end of the grid (UINT8 [0, 255]·scale − zero_point·scale; INT8 ±127·scale)
        levels, dtype = (127, np.int8) if signed else (255, np.uint8)
        scale = abs(value) / levels if value != 0 else 1.0
        if signed:
            zero_point, q = 0, int(np.sign(value)) * 127
        else:
            zero_point, q = (0, 255) if value > 0 else (255, 0) if value < 0 else (0, 0)
        base = f"{node.name}_operand"
        q_v = add_initializer(graph, namer, f"{base}_quantized", np.full(constant.shape, q, dtype))
        scale_v = add_initializer(graph, namer, f"{base}_scale", np.array(scale, np.float32))
        zp_v = add_initializer(graph, namer, f"{base}_zero_point", np.array(zero_point, dtype))
        dq = ir.node("DequantizeLinear", [q_v, scale_v, zp_v], name=namer.fresh(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = namer.fresh(f"{base}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(constant.shape)
        graph.insert_before(node, dq)
        old = node.inputs[index]
        node.replace_input_with(index, dq.outputs[0])
        _drop_if_unused(graph, old)
        quantized += 1
    return quantized


def _replace_node(graph: ir.Graph, namer: Namer, node: ir.Node, result: ir.Value) -> None:
    """`result` (computed by nodes already in the graph) takes over `node`'s output, whose name it gets
    where that is a model output; `node` goes."""
    old = node.outputs[0]
    was_output, name = old.is_graph_output(), old.name
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result.name = name if was_output else namer.fresh(name)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and not value.uses() and value.is_initializer() and not value.is_graph_input():
        graph.initializers.pop(value.name)


def drop_idle_qdq(plan: Plan) -> int:
    """Remove the planned Q/DQ pairs that no integer kernel would read or write; how many went.

    ORT turns DQ → op → Q into an integer kernel only when every data input of the op is dequantized
    and its output is quantized (on the CPU provider a QDQ MatMul without the Q runs in float, its
    weight dequantized on every run). A pair between ops that cannot become integer kernels
    (ConvTranspose, BatchNormalization, an Add of a per-channel float constant, ...) would run as a
    quantize and a dequantize of its own, costing time and precision for nothing. Ops that run on the
    integers or are dropped (Reshape, Split, an integer MaxPool, Relu, ...) join the tensors on both
    sides into one region; a region is kept when any of its tensors is written or read by an integer
    kernel. Removing an idle region cannot stop a kernel: a kernel's own tensors are never idle. The
    ops beside a removed pair are noted as float, with the reason."""
    planned = set(plan.activations)
    weights = {weight for weight, _ in plan.weights}

    def quantized(node: ir.Node, index: int) -> bool:
        value = node.inputs[index]
        producer = value.producer()
        return ((node, index) in plan.activations.get(value, ()) or value in weights
                or (producer is not None and producer.op_type == "DequantizeLinear"))

    def fuses(node: ir.Node) -> bool:
        if node.op_type not in ORT_INTEGER_KERNELS or node.domain not in ("", "ai.onnx") or node in plan.float_reasons:
            return False
        data = [i for i, v in enumerate(node.inputs) if v is not None and not is_index_input(node, i)
                and v.dtype in _FLOAT_DATA]
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            data = [i for i in data if i < 2]  # the bias is ORT's to convert
        return all(quantized(node, i) for i in data) and node.outputs[0] in planned

    region = {value: {value} for value in planned}
    for node in {user for slots in plan.activations.values() for user, _ in slots}:
        if node.op_type not in ORT_INTEGER_PASSTHROUGH or node in plan.float_reasons:
            continue
        sides = [v for v in (node.inputs[0], *node.outputs) if v in region]
        if len(sides) > 1 and node.inputs[0] in region:
            joined = set().union(*(region[v] for v in sides))
            for value in joined:
                region[value] = joined

    def guards(user: ir.Node) -> bool:
        """A float MaxPool with a quantized output needs its input pair too: without that DQ, ORT moves
        the output Q above the MaxPool and runs its slow 8-bit NCHW loop."""
        return user.op_type == "MaxPool" and user in plan.float_reasons and user.outputs[0] in planned

    useful: set[int] = set()
    for value, slots in plan.activations.items():
        producer = value.producer()
        if (producer is not None and fuses(producer)) or any(fuses(user) or guards(user) for user, _ in slots):
            useful.add(id(region[value]))
    idle = [value for value in planned if id(region[value]) not in useful]
    for value in idle:
        for node in [value.producer(), *(user for user, _ in plan.activations.pop(value))]:
            if node is not None:
                plan.float_reasons.setdefault(node, _IDLE_REASON)
    return len(idle)
