"""ONNX operators as torch functions, for the block converter (torch_block).

Each entry takes (node, its input tensors with None for omitted optional inputs, the opset) and returns
the node's outputs as a list. Float data stays float32; shape arithmetic (Shape, Gather, Concat of
int64 tensors…) runs on int64 tensors, so a Reshape fed by a shape computation works batch by batch.
Semantics follow the ONNX operator specification (default attributes included); what a function does
not cover raises `UnsupportedOp` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxq.errors import OnnxqError


class UnsupportedOp(OnnxqError):
    pass


def _unsupported(node: ir.Node, what: str) -> UnsupportedOp:
    return UnsupportedOp(f"{node.op_type} node '{node.name}': {what} is not supported by the block converter")


def _int(node, name, default):
    return node.attributes.get_int(name, default)


def _ints(node, name, default=None):
    value = node.attributes.get_ints(name, None)
    return list(value) if value is not None else default


def _float(node, name, default):
    return node.attributes.get_float(name, default)


def as_ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node, inputs, index, opset, since):
    """Axes given as an attribute before opset `since`, as input `index` from it on."""
    if opset >= since:
        return as_ints(inputs[index]) if len(inputs) > index else None
    return _ints(node, "axes")


# --- weighted ops -------------------------------------------------------------------------------------


def conv(node, x, w, b=None, *, opset=None):
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _unsupported(node, "auto_pad SAME_*")
    spatial = w.dim() - 2
    pads = _ints(node, "pads", [0] * 2 * spatial)
    if node.attributes.get_string("auto_pad", "NOTSET") == "VALID":
        pads = [0] * 2 * spatial
    strides = _ints(node, "strides", [1] * spatial)
    dilations = _ints(node, "dilations", [1] * spatial)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(spatial)
    if fn is None:
        raise _unsupported(node, f"{spatial}-D convolution")
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:  # torch pads symmetrically: pad by hand (F.pad lists the last axis first)
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (begin[i], end[i])])
        begin = [0] * spatial
    return fn(x, w, b, stride=strides, padding=begin, dilation=dilations, groups=_int(node, "group", 1))


def gemm(node, a, b, c=None, *, opset=None):
    a = a.T if _int(node, "transA", 0) else a
    b = b.T if _int(node, "transB", 0) else b
    y = _float(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _float(node, "beta", 1.0) * c


# --- element-wise ----------------------------------------------------------------------------------------


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def clip(node, x, lo=None, hi=None, *, opset):
    if opset < 11:
        lo, hi = _float(node, "min", -math.inf), _float(node, "max", math.inf)
    else:
        lo = None if lo is None else lo.item()
        hi = None if hi is None else hi.item()
    return torch.clamp(x, lo, hi)


def hard_sigmoid(node, x, *, opset):
    return torch.clamp(_float(node, "alpha", 0.2) * x + _float(node, "beta", 0.5), 0.0, 1.0)


def gelu(node, x, *, opset):
    return F.gelu(x, approximate=node.attributes.get_string("approximate", "none"))


def softmax(node, x, *, opset):
    if opset >= 13:
        return torch.softmax(x, _int(node, "axis", -1))
    axis = _int(node, "axis", 1) % x.dim()  # before 13: softmax over the input flattened to 2-D at axis
    return torch.softmax(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)


def layer_norm(node, x, scale, bias=None, *, opset):
    axis = _int(node, "axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + _float(node, "epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


def batch_norm(node, x, scale, bias, mean, var, *, opset):
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape) + _float(node, "epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv + bias.reshape(shape)


def reduce_mean(node, x, axes=None, *, opset):
    axes = _axes(node, [x, axes], 1, opset, 18)
    keep = bool(_int(node, "keepdims", 1))
    if not axes:
        if _int(node, "noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=axes, keepdim=keep)


# --- shape and data movement -------------------------------------------------------------------------


def reshape(node, x, shape, *, opset):
    target = as_ints(shape)
    if not _int(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def transpose(node, x, *, opset):
    return x.permute(_ints(node, "perm", list(reversed(range(x.dim())))))


def flatten(node, x, *, opset):
    axis = _int(node, "axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def concat(node, *xs, opset):
    return torch.cat([x for x in xs if x is not None], _int(node, "axis", 0))


def split(node, x, sizes=None, *, opset):
    axis = _int(node, "axis", 0)
    sizes = as_ints(sizes) if opset >= 13 else _ints(node, "split")
    count = len(node.outputs)
    if not sizes:
        parts = _int(node, "num_outputs", count)
        step = -(-x.shape[axis] // parts)  # the last part is smaller when the axis does not divide
        return list(torch.split(x, step, axis))
    return list(torch.split(x, sizes, axis))


def slice_(node, x, starts=None, ends=None, axes=None, steps=None, *, opset):
    if opset < 10:
        starts, ends, axes = _ints(node, "starts"), _ints(node, "ends"), _ints(node, "axes")
        steps = None
    else:
        starts, ends, axes, steps = as_ints(starts), as_ints(ends), as_ints(axes), as_ints(steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        index = range(*slice(start, end, step).indices(size))  # Python clamps as ONNX does
        x = x.index_select(axis, torch.tensor(list(index), dtype=torch.long, device=x.device))
    return x


def squeeze(node, x, axes=None, *, opset):
    axes = _axes(node, [x, axes], 1, opset, 13)
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def unsqueeze(node, x, axes=None, *, opset):
    axes = _axes(node, [x, axes], 1, opset, 13)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def shape(node, x, *, opset):
    dims = list(x.shape)
    start, end = _int(node, "start", 0), node.attributes.get_int("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def gather(node, data, indices, *, opset):
    axis = _int(node, "axis", 0) % data.dim()
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + data.shape[axis], flat)
    out = data.index_select(axis, flat)
    return out.reshape(list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1:]))


def constant_of_shape(node, dims, *, opset):
    value = node.attributes.get("value")
    fill = torch.from_numpy(value.value.numpy().copy()).reshape(()) if value is not None else torch.zeros(())
    return fill.to(dims.device).expand(as_ints(dims)).clone()


def cast(node, x, *, opset):
    to = ir.DataType(_int(node, "to", 1))
    if to in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return x.float()  # the block computes in float32 throughout
    if to in (ir.DataType.INT64, ir.DataType.INT32):
        return x.long()
    if to == ir.DataType.BOOL:
        return x.bool()
    raise _unsupported(node, f"Cast to {to.name}")


# --- pooling (2-D; 1-D pools run as 2-D with a unit axis) ---------------------------------------------


def _pool_geometry(node, x):
    """(kernel, dilations, strides, F.pad list, extra end padding per axis in F.pad's order).

    ONNX's output size: ⌊ or ⌈(in + pads − dilated kernel)/stride⌉ + 1, less one where ceil_mode's last
    window would start in the end padding. The extra end padding makes a floor-mode torch pool produce
    that size; it is never counted as data nor as padding."""
    spatial = x.dim() - 2
    if spatial != 2:
        raise _unsupported(node, f"{spatial}-D pooling")
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        raise _unsupported(node, "auto_pad")
    kernel = _ints(node, "kernel_shape")
    pads = _ints(node, "pads", [0] * 4)
    strides = _ints(node, "strides", [1] * 2)
    dilations = _ints(node, "dilations", [1] * 2)
    ceil = bool(_int(node, "ceil_mode", 0))
    extra = []
    for axis in range(2):
        size, begin, end = x.shape[2 + axis], pads[axis], pads[axis + 2]
        reach = (kernel[axis] - 1) * dilations[axis] + 1
        span = size + begin + end - reach
        out = (-(-span // strides[axis]) if ceil else span // strides[axis]) + 1
        if ceil and (out - 1) * strides[axis] >= size + begin:
            out -= 1
        extra.append(max(0, (out - 1) * strides[axis] + reach - (size + begin + end)))
    pad = [pads[1], pads[3], pads[0], pads[2]]
    return kernel, dilations, strides, pad, [0, extra[1], 0, extra[0]]


def average_pool(node, x, *, opset):
    kernel, dilations, strides, pad, extra = _pool_geometry(node, x)
    if dilations != [1, 1]:
        raise _unsupported(node, "dilated AveragePool")
    # window sums divided by the count of elements each window covers; which elements count (pads or
    # not, never the extra end padding) is a mask pooled the same way
    ones = torch.ones_like(x[:1, :1])
    counted = F.pad(F.pad(ones, pad, value=1.0 if _int(node, "count_include_pad", 0) else 0.0), extra)
    total = F.avg_pool2d(F.pad(F.pad(x, pad), extra), kernel, strides, divisor_override=1)
    count = F.avg_pool2d(counted, kernel, strides, divisor_override=1)
    return total / count


def max_pool(node, x, *, opset):
    if len(node.outputs) > 1 and node.outputs[1].consumers():
        raise _unsupported(node, "MaxPool's Indices output")
    if _int(node, "storage_order", 0):
        raise _unsupported(node, "storage_order 1")
    kernel, dilations, strides, pad, extra = _pool_geometry(node, x)
    padded = F.pad(F.pad(x, pad, value=-math.inf), extra, value=-math.inf)
    return F.max_pool2d(padded, kernel, strides, 0, dilations)


def trilu(node, x, k=None, *, opset):
    diagonal = 0 if k is None else int(k.item())
    return torch.triu(x, diagonal) if _int(node, "upper", 1) else torch.tril(x, diagonal)


def expand(node, x, dims, *, opset):
    return x * torch.ones(as_ints(dims), dtype=x.dtype, device=x.device)  # ONNX Expand broadcasts both ways


def range_(node, start, limit, delta, *, opset):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _variadic(fn: Callable) -> Callable:
    """ONNX Min/Max: any number of inputs, broadcast together."""
    def run(node, *xs, opset):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _one(fn: Callable) -> Callable:
    """A function of the inputs alone, ignoring attributes."""
    return lambda node, *xs, opset: fn(*xs)


OPS: dict[str, Callable] = {
    "Conv": conv, "Gemm": gemm, "MatMul": _one(torch.matmul),
    "Add": _one(torch.add), "Sub": _one(torch.sub), "Mul": _one(torch.mul), "Div": _one(_div),
    "Pow": _one(torch.pow), "Sqrt": _one(torch.sqrt), "Neg": _one(torch.neg), "Exp": _one(torch.exp),
    "Reciprocal": _one(torch.reciprocal), "Abs": _one(torch.abs),
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum),  # a Clip split in two (ReLU6 as Max, Min)
    "Relu": _one(torch.relu), "Clip": clip, "Sigmoid": _one(torch.sigmoid), "HardSigmoid": hard_sigmoid,
    "HardSwish": _one(F.hardswish), "Tanh": _one(torch.tanh), "Erf": _one(torch.erf), "Gelu": gelu,
    "Softmax": softmax, "LayerNormalization": layer_norm, "BatchNormalization": batch_norm,
    "ReduceMean": reduce_mean,
    "Reshape": reshape, "Transpose": transpose, "Flatten": flatten, "Concat": concat, "Split": split,
    "Slice": slice_, "Squeeze": squeeze, "Unsqueeze": unsqueeze,
    "GlobalAveragePool": _one(lambda x: x.mean(dim=list(range(2, x.dim())), keepdim=True)),
    "AveragePool": average_pool, "MaxPool": max_pool,
    "Identity": _one(lambda x: x), "Dropout": _one(lambda x, *rest: x), "Cast": cast,
    "Shape": shape, "Gather": gather, "ConstantOfShape": constant_of_shape,
    # what exporters build attention masks with
    "Trilu": trilu, "Where": _one(torch.where), "Expand": expand, "Equal": _one(torch.eq), "Less": _one(torch.lt),
    "Greater": _one(torch.gt), "LessOrEqual": _one(torch.le), "GreaterOrEqual": _one(torch.ge),
    "Not": _one(torch.logical_not), "And": _one(torch.logical_and), "Or": _one(torch.logical_or), "Range": range_,
    "Sin": _one(torch.sin), "Cos": _one(torch.cos),  # rotary tables computed in the graph
}


def run_op(node: ir.Node, inputs: list, opset: int) -> list:
    """The node's outputs (a list, one per ONNX output that the function produces)."""
    fn = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if fn is None:
        op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        raise UnsupportedOp(f"op {op} (node '{node.name}') is not supported by the block converter; "
                            f"supported: {', '.join(sorted(OPS))}")
    # trailing omitted optional inputs are dropped so each function's defaults apply
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    out = fn(node, *inputs, opset=opset)
    return out if isinstance(out, list) else [out]
