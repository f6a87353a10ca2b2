"""Structure recognition on exported transformer graphs: by pattern, never by node names.

`analyse(model)` returns a `Structure` of plain dataclasses that passes read and edit through:

| dataclass | what it holds |
|---|---|
| `Linear` | MatMul/Gemm with a constant 2-D weight, plus its bias (Gemm C or a following Add of a 1-D constant) |
| `Norm` | LayerNormalization / RMSNormalization / SimplifiedLayerNormalization ops, and the decomposed forms exporters write: RMS (Pow or Mul square, ReduceMean, Add ε, Sqrt, then Div, Reciprocal·Mul or Div(1, ·)·Mul) and LayerNorm (ReduceMean, Sub, …); γ and β if present |
| `Attention` | Q/K/V projections, the per-head reshape/transpose paths, QKᵀ MatMul, Softmax, PV MatMul, output projection; heads, KV heads (GQA), head dim, RoPE |
| `MLP` | SwiGLU (SiLU(gate)·up → down), GeGLU, or a plain act MLP (GELU in Erf or op form, ReLU, SiLU) |
| `Embedding` | Gather of a constant table by integer indices |
| `ResidualStream` | the tensors from the embeddings through every residual Add, who writes them, which norms and linears read them, the final norm, the LM head, and every reason a stream rotation would not be exact |

Three steps are kept apart, as in onnxscript's rewriter: *match* (a pattern or a graph walk finds
candidate nodes), *check* (conditions on constants, shapes and readers; a failed check is recorded in
`Structure.rejected` with the reason), and *rewrite* (done by the passes, never here). Norm and GELU
subgraphs are matched with `onnxscript.rewriter.pattern`; attention, MLPs and the residual stream are
walks over the IR, since their interiors (RoPE, GQA repeat, dynamic reshapes) vary too much between
exporters for a fixed pattern.

Other passes use it like this:
    s = analyse(model)
    for norm in s.norms: ...              # every LayerNorm/RMSNorm, fused or decomposed
    for att in s.attentions: att.softmax  # the Softmax node of each attention
    find_norms(model), find_softmaxes(model)   # the cheap entry points
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import attr
from onnxq.ir.graph import const_array as _const_array

__all__ = ["Linear", "Norm", "Attention", "MLP", "Embedding", "ResidualStream", "Structure", "Rejection",
           "analyse", "find_linears", "find_norms", "find_softmaxes", "is_transformer"]

_FLOAT_CASTS = {int(ir.DataType.FLOAT), int(ir.DataType.FLOAT16), int(ir.DataType.BFLOAT16), int(ir.DataType.DOUBLE)}
_SHAPE_ONLY = ("Shape", "Size")  # readers that see only a tensor's shape, never its values
_PASS_THROUGH = ("Identity", "Dropout")  # no-ops in inference


# ----------------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class Rejection:
    """A candidate that matched but failed a check, and why."""

    what: str
    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.what} at '{self.where}': {self.why}"


@dataclass(eq=False)
class Linear:
    """y = x·W (+ b): MatMul with a constant [in, out] weight, or Gemm (weight [out, in] when transB)."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None  # the Add carrying the bias, when it is not Gemm's C
    transposed: bool = False

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.bias_node.outputs[0] if self.bias_node is not None else self.node.outputs[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        shape = tuple(const_array(self.weight).shape) if self.weight.shape is None else tuple(self.weight.shape)
        return (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    @property
    def in_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[1])

    def weight_io(self) -> np.ndarray:
        """The weight as an [in, out] array (a copy for Gemm with transB)."""
        w = const_array(self.weight)
        return w.T if self.transposed else w

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else const_array(self.bias)


@dataclass(eq=False)
class Norm:
    """A normalisation over the last axis: y = γ ⊙ normalize(x) + β (γ, β optional)."""

    kind: str  # "rms" | "layer"
    form: str  # the op type of a fused norm, or "decomposed"
    input: ir.Value
    output: ir.Value  # what readers read (after γ and β)
    nodes: list[ir.Node]
    epsilon: float
    normalized: ir.Value | None = None  # decomposed forms: the tensor before γ
    scale: ir.Value | None = None  # γ (constant), input 1 of a fused op or the Mul's constant
    bias: ir.Value | None = None  # β (constant)
    scale_node: ir.Node | None = None  # decomposed: the Mul by γ
    bias_node: ir.Node | None = None  # decomposed: the Add of β
    op: ir.Node | None = None  # fused op (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization)

    @property
    def name(self) -> str:
        return (self.op or self.nodes[-1]).name or ""

    @property
    def width(self) -> int | None:
        for v in (self.scale, self.bias):
            if v is not None and const_array(v) is not None:
                return int(const_array(v).size)
        shape = self.input.shape
        if shape is not None and len(shape) and isinstance(shape[-1], int):
            return int(shape[-1])
        return None

    def gamma(self) -> np.ndarray | None:
        return None if self.scale is None else const_array(self.scale)

    def beta(self) -> np.ndarray | None:
        return None if self.bias is None else const_array(self.bias)

    @property
    def has_affine(self) -> bool:
        g, b = self.gamma(), self.beta()
        return (g is not None and not np.all(g == 1)) or (b is not None and np.any(b != 0))


@dataclass(eq=False)
class Attention:
    """Scaled dot-product attention with its projections."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear | None
    qk: ir.Node  # MatMul(Q, Kᵀ)
    softmax: ir.Node
    pv: ir.Node  # MatMul(P, V)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    v_path: list[ir.Node]  # nodes between v.output and pv's second input
    o_path: list[ir.Node]  # nodes between pv's output and o.input
    v_path_plain: bool  # only reshapes/transposes/expands: a per-head channel transform commutes with it

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The KV head a query head reads (HF repeat_kv: kv head g serves heads g·n_rep … g·n_rep+n_rep−1)."""
        return head // self.group_size


@dataclass(eq=False)
class MLP:
    kind: str  # "swiglu" | "geglu" | "gelu" | "relu" | "silu"
    up: Linear
    down: Linear
    gate: Linear | None = None
    product: ir.Node | None = None  # gated: Mul(act(gate), up)
    act_nodes: list[ir.Node] = field(default_factory=list)
    gelu_divisor: ir.Node | None = None  # Erf-form GELU: the Div(x, √2) (or Mul(x, 1/√2)) inside Erf


@dataclass(eq=False)
class Embedding:
    node: ir.Node  # Gather(table, indices)

    @property
    def table(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def name(self) -> str:
        return self.node.name or ""


@dataclass(eq=False)
class ResidualStream:
    width: int
    values: list[ir.Value]  # the stream's tensors, in order
    adds: list[ir.Node]  # the residual Adds
    embeddings: list[Embedding]  # writers of the first value
    writers: list[Linear]  # linears whose output is added into the stream
    norms: list[Norm]  # norms that read the stream
    readers: list[Linear]  # linears that read those norms' outputs (or the stream directly)
    final_norm: Norm | None
    lm_head: Linear | None
    pre_norm: bool
    problems: list[str] = field(default_factory=list)  # why rotating the stream would not be exact

    @property
    def rotatable(self) -> bool:
        return not self.problems


@dataclass
class Structure:
    linears: list[Linear] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    mlps: list[MLP] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)
    stream: ResidualStream | None = None
    lm_head: Linear | None = None
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def is_transformer(self) -> bool:
        return bool(self.attentions) and bool(self.norms)

    def linear_at(self, node: ir.Node) -> Linear | None:
        return next((lin for lin in self.linears if lin.node is node), None)

    def norm_reading(self, value: ir.Value) -> Norm | None:
        return next((n for n in self.norms if n.input is value), None)

    def summary(self) -> dict:
        out = {"linears": len(self.linears), "norms": len(self.norms),
               "norm_forms": sorted({f"{n.kind}:{n.form}" for n in self.norms}),
               "attentions": len(self.attentions), "mlps": sorted({m.kind for m in self.mlps}),
               "embeddings": len(self.embeddings), "lm_head": self.lm_head.name if self.lm_head else None}
        if self.attentions:
            a = self.attentions[0]
            out.update(heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim, rope=a.rope)
        if self.stream is not None:
            out.update(stream_width=self.stream.width, pre_norm=self.stream.pre_norm,
                       residual_adds=len(self.stream.adds), stream_rotatable=self.stream.rotatable)
        return out


# ----------------------------------------------------------------------------------------------------
# small helpers


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """onnxq.ir.graph.const_array, also through Identity nodes (the legacy exporter writes one for every
    initializer it de-duplicates; fold_constants removes them later)."""
    for _ in range(4):
        if value is None:
            return None
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return _const_array(value)
        value = producer.inputs[0]
    return None


def _scalar(value: ir.Value | None) -> float | None:
    a = const_array(value)
    if a is None or a.size != 1:
        return None
    return float(a.reshape(()))


def _is_float_cast(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Cast" and attr(node, "to") in _FLOAT_CASTS


def _skip_casts_back(value: ir.Value) -> ir.Value:
    """The tensor before any float→float Casts / Identities that produced `value`."""
    while value.producer() is not None and (_is_float_cast(value.producer()) or value.producer().op_type in _PASS_THROUGH):
        value = value.producer().inputs[0]
    return value


def _sole_reader(value: ir.Value) -> ir.Node | None:
    """The single node that reads `value`'s data (Shape readers ignored), None if several or an output."""
    users = [u for u in value.consumers() if u.op_type not in _SHAPE_ONLY]
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0]


def _skip_casts_forward(value: ir.Value) -> ir.Value:
    while True:
        user = _sole_reader(value)
        if user is None or not (_is_float_cast(user) or user.op_type in _PASS_THROUGH):
            return value
        value = user.outputs[0]


def _data_readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    return [(n, i) for n, i in value.uses() if n.op_type not in _SHAPE_ONLY]


def _vector_const(value: ir.Value | None, width: int | None = None) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only (shape [..., 1, d] or [d])."""
    a = const_array(value)
    if a is None or a.ndim == 0:
        return None
    if any(d != 1 for d in a.shape[:-1]):
        return None
    if width is not None and a.shape[-1] != width:
        return None
    return a.reshape(-1)


def _last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or not len(value.shape):
        return None
    d = value.shape[-1]
    return int(d) if isinstance(d, int) else None


def _reduce_axes(node: ir.Node) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        a = const_array(node.inputs[1])
        axes = None if a is None else a.reshape(-1).tolist()
    return None if axes is None else [int(x) for x in axes]


def _is_last_axis(axes: list[int] | None, value: ir.Value) -> bool:
    if axes is None or len(axes) != 1:
        return False
    if axes[0] == -1:
        return True
    rank = len(value.shape) if value.shape is not None else None
    return rank is not None and axes[0] == rank - 1


# ----------------------------------------------------------------------------------------------------
# linear layers


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(weight value, transposed) when `node` is a MatMul/Gemm with a constant 2-D weight."""
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        w = node.inputs[1]
        a = const_array(w)
        if a is not None and a.ndim == 2 and const_array(node.inputs[0]) is None:
            return w, False
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return None
        w = node.inputs[1]
        a = const_array(w)
        if a is not None and a.ndim == 2 and const_array(node.inputs[0]) is None:
            return w, bool(attr(node, "transB", 0))
    return None


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every MatMul/Gemm with a constant 2-D weight, with its bias when there is one."""
    out = []
    for node in graph:
        found = _weight_of(node)
        if found is None:
            continue
        weight, transposed = found
        lin = Linear(node, weight, transposed=transposed)
        out_features = lin.out_features
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            if _vector_const(node.inputs[2], out_features) is not None and const_array(node.inputs[2]).ndim == 1:
                lin.bias = node.inputs[2]
            else:
                continue  # a Gemm C that is not a plain bias: not a linear layer we can edit
        else:
            user = _sole_reader(node.outputs[0])
            if user is not None and user.op_type == "Add" and len(user.inputs) == 2:
                other = user.inputs[1] if user.inputs[0] is node.outputs[0] else user.inputs[0]
                b = const_array(other)
                if b is not None and b.ndim == 1 and b.shape[0] == out_features:
                    lin.bias, lin.bias_node = other, user
        out.append(lin)
    return out


# ----------------------------------------------------------------------------------------------------
# norms: onnxscript patterns for the decomposed forms


def _pattern_api():
    from onnxscript.rewriter import pattern

    return pattern


def _rms_patterns():
    pattern = _pattern_api()

    def denominator(op, xc, eps, two):
        square = pattern.OrValue([op.Pow(xc, two), op.Mul(xc, xc)])
        mean = pattern.OrValue([op.ReduceMean(square, _allow_other_attributes=True),
                                op.ReduceMean(square, pattern.Var("axes"), _allow_other_attributes=True)])
        return op.Sqrt(pattern.OrValue([op.Add(mean, eps), op.Add(eps, mean)]))

    def times_inverse(op, xc, eps, two, one):
        den = denominator(op, xc, eps, two)
        return op.Mul(xc, pattern.OrValue([op.Reciprocal(den), op.Div(one, den)]))

    def inverse_times(op, xc, eps, two, one):
        den = denominator(op, xc, eps, two)
        return op.Mul(pattern.OrValue([op.Reciprocal(den), op.Div(one, den)]), xc)

    def divided(op, xc, eps, two):
        return op.Div(xc, denominator(op, xc, eps, two))

    return [pattern.Pattern(f, name=f"rms:{f.__name__}") for f in (times_inverse, inverse_times, divided)]


def _layernorm_patterns():
    pattern = _pattern_api()

    def centred(op, x):
        mean = pattern.OrValue([op.ReduceMean(x, _allow_other_attributes=True),
                                op.ReduceMean(x, pattern.Var("axes0"), _allow_other_attributes=True)])
        return op.Sub(x, mean)

    def denominator(op, d, eps, two):
        square = pattern.OrValue([op.Pow(d, two), op.Mul(d, d)])
        var = pattern.OrValue([op.ReduceMean(square, _allow_other_attributes=True),
                               op.ReduceMean(square, pattern.Var("axes1"), _allow_other_attributes=True)])
        return op.Sqrt(pattern.OrValue([op.Add(var, eps), op.Add(eps, var)]))

    def divided(op, x, eps, two):
        d = centred(op, x)
        return op.Div(d, denominator(op, d, eps, two))

    def times_inverse(op, x, eps, two, one):
        d = centred(op, x)
        den = denominator(op, d, eps, two)
        return op.Mul(d, pattern.OrValue([op.Reciprocal(den), op.Div(one, den)]))

    return [pattern.Pattern(f, name=f"layernorm:{f.__name__}") for f in (divided, times_inverse)]


_PATTERN_CACHE: dict[str, list] = {}


def _patterns(kind: str) -> list:
    if kind not in _PATTERN_CACHE:
        _PATTERN_CACHE[kind] = _rms_patterns() if kind == "rms" else _layernorm_patterns()
    return _PATTERN_CACHE[kind]


def _check_decomposed(kind: str, match, root: ir.Node) -> tuple[dict | None, str | None]:
    """Check a decomposed-norm match: ε a small scalar, exponent 2, mean over the last axis, and the
    Div(1, ·) numerator exactly 1. Returns (facts, None) or (None, reason)."""
    b = match.bindings
    x = b.get("xc") if kind == "rms" else b.get("x")
    eps = _scalar(b.get("eps"))
    if eps is None or not (0 <= eps < 1e-1):
        return None, "ε is not a small constant scalar"
    two = b.get("two")
    if two is not None and _scalar(two) != 2.0:
        return None, "the square is a Pow with an exponent other than 2"
    one = b.get("one")
    if one is not None and _scalar(one) != 1.0:
        return None, "Div(c, √·) with c ≠ 1"
    for node in match.nodes:
        if node.op_type == "ReduceMean":
            if not _is_last_axis(_reduce_axes(node), node.inputs[0]):
                return None, "ReduceMean is not over the last axis alone"
            if attr(node, "keepdims", 1) != 1:
                return None, "ReduceMean without keepdims"
    return {"x": x, "eps": eps}, None


def _affine_tail(norm: Norm) -> None:
    """Attach the γ Mul and β Add that follow a decomposed norm (through float Casts)."""
    value = norm.normalized
    tail = _skip_casts_forward(value)
    nodes = []
    user = _sole_reader(tail)
    width = _last_dim(norm.input)
    if user is not None and user.op_type == "Mul" and len(user.inputs) == 2:
        other = user.inputs[1] if user.inputs[0] is tail else user.inputs[0]
        if other is not tail and _vector_const(other, width) is not None:
            norm.scale, norm.scale_node = other, user
            nodes.append(user)
            tail = user.outputs[0]
            user = _sole_reader(tail)
    if user is not None and user.op_type == "Add" and len(user.inputs) == 2:
        other = user.inputs[1] if user.inputs[0] is tail else user.inputs[0]
        if other is not tail and _vector_const(other, width) is not None:
            norm.bias, norm.bias_node = other, user
            nodes.append(user)
            tail = user.outputs[0]
    norm.output = tail
    norm.nodes.extend(nodes)


def find_norms(model: ir.Model, rejected: list[Rejection] | None = None) -> list[Norm]:
    """Every LayerNorm and RMSNorm over the last axis, fused or decomposed."""
    graph = model.graph
    rejected = rejected if rejected is not None else []
    norms: list[Norm] = []
    claimed: set[ir.Node] = set()
    for node in graph:
        if node.op_type in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
            norm = _fused_norm(node, rejected)
            if norm is not None:
                norms.append(norm)
            continue
        if node.op_type not in ("Mul", "Div") or node in claimed:
            continue
        for kind in ("layer", "rms") if node.op_type in ("Div", "Mul") else ():
            norm = _match_decomposed(model, node, kind, rejected)
            if norm is not None:
                norms.append(norm)
                claimed.update(norm.nodes)
                break
    # a LayerNorm's Sub/ReduceMean also matches "rms" on the centred tensor: keep the layer form only
    layer_inputs = {id(n.normalized) for n in norms if n.kind == "layer"}
    return [n for n in norms if not (n.kind == "rms" and id(n.normalized) in layer_inputs)]


def _fused_norm(node: ir.Node, rejected: list[Rejection]) -> Norm | None:
    axis = attr(node, "axis", -1)
    x = node.inputs[0]
    if not (axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)):
        rejected.append(Rejection(node.op_type, node.name or "", f"normalises from axis {axis}, not the last axis alone"))
        return None
    if len(node.outputs) > 1 and any(o is not None and o.name and o.uses() for o in node.outputs[1:]):
        rejected.append(Rejection(node.op_type, node.name or "", "its mean/inv-std outputs are used"))
        return None
    kind = "layer" if node.op_type == "LayerNormalization" else "rms"
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if scale is not None and _vector_const(scale) is None:
        rejected.append(Rejection(node.op_type, node.name or "", "γ is not a constant vector"))
        return None
    if bias is not None and _vector_const(bias) is None:
        rejected.append(Rejection(node.op_type, node.name or "", "β is not a constant vector"))
        return None
    eps = float(attr(node, "epsilon", 1e-5))
    return Norm(kind, node.op_type, x, node.outputs[0], [node], eps, None, scale, bias, op=node)


def _match_decomposed(model: ir.Model, node: ir.Node, kind: str, rejected: list[Rejection]) -> Norm | None:
    for pat in _patterns(kind):
        match = pat.match(model, model.graph, node, check_nodes_are_removable=False)
        if not match:
            continue
        facts, why = _check_decomposed(kind, match, node)
        if facts is None:
            rejected.append(Rejection(f"{kind} norm", node.name or "", why))
            return None
        x_c = facts["x"]
        nodes = list(match.nodes)
        x = _skip_casts_back(x_c)
        if x is not x_c:
            nodes = [x_c.producer(), *nodes] if x_c.producer() is not None else nodes
        norm = Norm(kind, "decomposed", x, node.outputs[0], nodes, facts["eps"], normalized=node.outputs[0])
        _affine_tail(norm)
        # a decomposed norm's interior must not leak to other readers
        inside = set(norm.nodes)
        for n in match.nodes:
            for out in n.outputs:
                if out is node.outputs[0]:
                    continue
                if any(u not in inside for u in out.consumers()):
                    rejected.append(Rejection(f"{kind} norm", node.name or "", f"intermediate '{out.name}' has readers outside the norm"))
                    return None
        return norm
    return None


# ----------------------------------------------------------------------------------------------------
# embeddings and attention


def find_embeddings(graph: ir.Graph) -> list[Embedding]:
    out = []
    for node in graph:
        if node.op_type != "Gather" or attr(node, "axis", 0) != 0 or len(node.inputs) != 2:
            continue
        table = const_array(node.inputs[0])
        if table is None or table.ndim != 2 or table.dtype.kind != "f" or const_array(node.inputs[1]) is not None:
            continue
        out.append(Embedding(node))
    return out


# ops an attention path may cross between a projection and the attention MatMuls
_HEAD_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Dropout", "Slice",
             "Concat", "Neg", "Mul", "Add", "Sub", "Div", "Split", "Tile"}
_PLAIN_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Dropout", "Tile"}
_DATA_ONLY = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Split", "Tile", "Cast", "Identity", "Dropout"}


def _trace_to_linears(value: ir.Value, by_output: dict[ir.Value, Linear], barriers: set[ir.Value],
                      limit: int = 64) -> tuple[set[Linear], list[ir.Node], str | None]:
    """Walk back from `value` through head-shaping ops to the linear layers that produce it."""
    found: set[Linear] = set()
    nodes: list[ir.Node] = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in by_output:
            found.add(by_output[v])
            continue
        if v in barriers:
            return found, nodes, f"reaches '{v.name}' (a norm output) without passing a projection"
        producer = v.producer()
        if producer is None or const_array(v) is not None or producer.op_type not in _HEAD_OPS:
            continue
        nodes.append(producer)
        if len(nodes) > limit:
            return found, nodes, "path longer than expected"
        inputs = producer.inputs[:1] if producer.op_type in _DATA_ONLY else producer.inputs
        stack.extend(i for i in inputs if i is not None and const_array(i) is None)
    return found, nodes, None


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """The QKᵀ MatMul feeding `softmax`, through scaling (Mul/Div by a constant), mask Adds and Where."""
    v = softmax.inputs[0]
    for _ in range(8):
        p = v.producer()
        if p is None:
            return None
        if p.op_type == "MatMul":
            return p if all(const_array(i) is None for i in p.inputs) else None
        if p.op_type in ("Mul", "Div") and const_array(p.inputs[1]) is not None:
            v = p.inputs[0]
        elif p.op_type == "Mul" and const_array(p.inputs[0]) is not None:
            v = p.inputs[1]
        elif p.op_type == "Add":
            # the scores are the operand that is not the mask; the mask traces back to no MatMul
            a, b = p.inputs
            v = a if _reaches_matmul(a) else b
        elif p.op_type == "Where":
            v = p.inputs[2] if _reaches_matmul(p.inputs[2]) else p.inputs[1]
        elif _is_float_cast(p) or p.op_type in _PASS_THROUGH:
            v = p.inputs[0]
        else:
            return None
    return None


def _reaches_matmul(v: ir.Value | None, depth: int = 4) -> bool:
    for _ in range(depth):
        if v is None or v.producer() is None:
            return False
        p = v.producer()
        if p.op_type == "MatMul":
            return True
        v = p.inputs[0]
    return False


def _pv_matmul(softmax: ir.Node) -> ir.Node | None:
    v = _skip_casts_forward(softmax.outputs[0])
    user = _sole_reader(v)
    if user is not None and user.op_type == "MatMul" and user.inputs[0] is v and const_array(user.inputs[1]) is None:
        return user
    return None


def _forward_to_linear(value: ir.Value, by_input: dict[ir.Value, list[Linear]]) -> tuple[Linear | None, list[ir.Node]]:
    nodes = []
    for _ in range(8):
        if value in by_input and len(by_input[value]) == 1 and len(_data_readers(value)) == 1:
            return by_input[value][0], nodes
        user = _sole_reader(value)
        if user is None or user.op_type not in ("Transpose", "Reshape", "Identity", "Cast", "Dropout"):
            return None, nodes
        nodes.append(user)
        value = user.outputs[0]
    return None, nodes


def _head_dim(qk: ir.Node, q_nodes: list[ir.Node]) -> int | None:
    d = _last_dim(qk.inputs[0])
    if d:
        return d
    for node in q_nodes:
        if node.op_type == "Reshape":
            d = _last_dim(node.outputs[0])
            if d:
                return d
            shape = const_array(node.inputs[1])
            if shape is not None and shape.size >= 1 and shape.reshape(-1)[-1] > 0:
                return int(shape.reshape(-1)[-1])
            producer = node.inputs[1].producer()
            if producer is not None and producer.op_type == "Concat":
                last = const_array(producer.inputs[-1])
                if last is not None and last.size == 1 and int(last.reshape(-1)[0]) > 0:
                    return int(last.reshape(-1)[0])
    return None


def find_attentions(graph: ir.Graph, linears: list[Linear], norms: list[Norm],
                    rejected: list[Rejection]) -> list[Attention]:
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    barriers = {n.output for n in norms}
    found = []
    for sm in graph:
        if sm.op_type != "Softmax":
            continue
        where = sm.name or ""
        qk = _scores_matmul(sm)
        pv = _pv_matmul(sm)
        if qk is None or pv is None:
            rejected.append(Rejection("attention", where, "Softmax is not between two activation MatMuls"))
            continue
        q_set, q_nodes, q_why = _trace_to_linears(qk.inputs[0], by_output, barriers)
        k_set, k_nodes, k_why = _trace_to_linears(qk.inputs[1], by_output, barriers)
        v_set, v_nodes, v_why = _trace_to_linears(pv.inputs[1], by_output, barriers)
        why = q_why or k_why or v_why
        if why or len(q_set) != 1 or len(k_set) != 1 or len(v_set) != 1:
            rejected.append(Rejection("attention", where, why or "Q, K and V do not each come from one projection "
                                      f"(found {len(q_set)}, {len(k_set)}, {len(v_set)})"))
            continue
        (q,), (k,), (v,) = q_set, k_set, v_set
        if len({q, k, v}) != 3:
            rejected.append(Rejection("attention", where, "Q, K and V share a fused projection (not split here)"))
            continue
        head_dim = _head_dim(qk, q_nodes)
        if not head_dim or q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features:
            rejected.append(Rejection("attention", where, f"head size unknown or inconsistent (head_dim={head_dim})"))
            continue
        o, o_nodes = _forward_to_linear(pv.outputs[0], by_input)
        if o is not None and o.in_features != q.out_features:
            o = None
        rope = any(n.op_type in ("Neg", "Concat") or (n.op_type == "Mul" and all(const_array(i) is None for i in n.inputs))
                   for n in q_nodes + k_nodes)
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if heads % kv_heads:
            rejected.append(Rejection("attention", where, f"{heads} query heads do not divide into {kv_heads} KV heads"))
            continue
        plain = all(n.op_type in _PLAIN_OPS for n in v_nodes) and all(
            _last_dim(n.outputs[0]) in (None, head_dim) for n in v_nodes) and all(
            list(attr(n, "perm", [0]))[-1] == len(attr(n, "perm", [0])) - 1 for n in v_nodes if n.op_type == "Transpose")
        found.append(Attention(q, k, v, o, qk, sm, pv, heads, kv_heads, head_dim, rope, v_nodes[::-1], o_nodes, plain))
    return found


def find_softmaxes(model: ir.Model) -> list[ir.Node]:
    """Softmax nodes that sit in attention (between the QKᵀ and PV MatMuls)."""
    return [sm for sm in model.graph if sm.op_type == "Softmax" and _scores_matmul(sm) is not None
            and _pv_matmul(sm) is not None]


# ----------------------------------------------------------------------------------------------------
# MLPs


def _silu_input(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """x when value = x·Sigmoid(x) (either order) or Swish(x)."""
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Swish" and attr(p, "alpha", 1.0) == 1.0:
        return p.inputs[0], [p]
    if p.op_type == "Mul" and len(p.inputs) == 2:
        for x, s in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
            sp = s.producer()
            if sp is not None and sp.op_type == "Sigmoid" and sp.inputs[0] is x:
                return x, [sp, p]
    return None


def _gelu_pattern():
    pattern = _pattern_api()

    def erf_gelu(op, x, root2, one, half):
        erf = op.Erf(pattern.OrValue([op.Div(x, root2), op.Mul(x, root2)], tag_var="divisor"))
        plus = pattern.OrValue([op.Add(erf, one), op.Add(one, erf)])
        inner = pattern.OrValue([op.Mul(x, plus), op.Mul(plus, x)])
        return op.Mul(inner, half)

    def erf_gelu_half_first(op, x, root2, one, half):
        erf = op.Erf(pattern.OrValue([op.Div(x, root2), op.Mul(x, root2)], tag_var="divisor"))
        plus = pattern.OrValue([op.Add(erf, one), op.Add(one, erf)])
        return op.Mul(pattern.OrValue([op.Mul(x, half), op.Mul(half, x)]), plus)

    def erf_gelu_half_last(op, x, root2, one, half):
        erf = op.Erf(pattern.OrValue([op.Div(x, root2), op.Mul(x, root2)], tag_var="divisor"))
        plus = pattern.OrValue([op.Add(erf, one), op.Add(one, erf)])
        return op.Mul(x, op.Mul(plus, half))

    return [pattern.Pattern(f, name=f"gelu:{f.__name__}") for f in (erf_gelu, erf_gelu_half_first, erf_gelu_half_last)]


def _gelu_input(model: ir.Model, value: ir.Value) -> tuple[ir.Value, list[ir.Node], ir.Node | None] | None:
    """x when value = GELU(x): the Gelu op, or the Erf form 0.5·x·(1 + erf(x/√2)) in its usual orders."""
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Gelu":
        return p.inputs[0], [p], None
    if p.op_type != "Mul":
        return None
    if "gelu" not in _PATTERN_CACHE:
        _PATTERN_CACHE["gelu"] = _gelu_pattern()
    for pat in _PATTERN_CACHE["gelu"]:
        match = pat.match(model, model.graph, p, check_nodes_are_removable=False)
        if not match:
            continue
        b = match.bindings
        half, one, root2 = _scalar(b.get("half")), _scalar(b.get("one")), _scalar(b.get("root2"))
        if half is None or one != 1.0 or not math.isclose(half, 0.5, rel_tol=1e-6):
            continue
        if root2 is None:  # S-GELU (after smooth): a per-channel divisor √2/s inside erf
            vector = _vector_const(b.get("root2"))
            if vector is None or not np.all(vector > 0):
                continue
            root2 = math.sqrt(2) if any(n.op_type == "Div" for n in match.nodes if n.outputs[0].consumers()
                                        and n.outputs[0].consumers()[0].op_type == "Erf") else 1 / math.sqrt(2)
            scaled = True
        else:
            scaled = False
        divisor = next((n for n in match.nodes if n.op_type in ("Div", "Mul") and n.outputs[0].consumers()
                        and n.outputs[0].consumers()[0].op_type == "Erf"), None)
        if divisor is None:
            continue
        ok = scaled or (divisor.op_type == "Div" and math.isclose(root2, math.sqrt(2), rel_tol=1e-5)) or \
            (divisor.op_type == "Mul" and math.isclose(root2, 1 / math.sqrt(2), rel_tol=1e-5))
        if ok:
            return b["x"], list(match.nodes), divisor
    return None


def find_mlps(model: ir.Model, linears: list[Linear], rejected: list[Rejection]) -> list[MLP]:
    by_output = {lin.output: lin for lin in linears}
    out = []
    for down in linears:
        a = down.input
        p = a.producer()
        if p is None:
            continue
        if p.op_type == "Mul" and len(p.inputs) == 2 and all(const_array(i) is None for i in p.inputs):
            for g_val, u_val in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
                up = by_output.get(u_val)
                if up is None:
                    continue
                silu = _silu_input(g_val)
                gelu = None if silu is not None else _gelu_input(model, g_val)
                act = silu or (gelu[:2] if gelu else None)
                if act is None or act[0] not in by_output:
                    continue
                gate = by_output[act[0]]
                if gate.input is not up.input:
                    rejected.append(Rejection("gated MLP", p.name or "", "gate and up read different inputs"))
                    break
                out.append(MLP("swiglu" if silu else "geglu", up, down, gate, p, act[1]))
                break
            continue
        silu = _silu_input(a)
        if silu is not None and silu[0] in by_output:
            out.append(MLP("silu", by_output[silu[0]], down, act_nodes=silu[1]))
            continue
        gelu = _gelu_input(model, a)
        if gelu is not None and gelu[0] in by_output:
            out.append(MLP("gelu", by_output[gelu[0]], down, act_nodes=gelu[1], gelu_divisor=gelu[2]))
            continue
        if p.op_type == "Relu" and p.inputs[0] in by_output:
            out.append(MLP("relu", by_output[p.inputs[0]], down, act_nodes=[p]))
    return out


# ----------------------------------------------------------------------------------------------------
# residual stream


def _stream_start(embeddings: list[Embedding], graph: ir.Graph) -> Embedding | None:
    """The token embedding: a Gather whose indices come (through Casts) from a graph input, widest table."""
    inputs = set(graph.inputs)
    candidates = [e for e in embeddings if _skip_casts_back(e.node.inputs[1]) in inputs]
    if not candidates:
        return None
    return max(candidates, key=lambda e: const_array(e.table).shape[0])


def find_residual_stream(graph: ir.Graph, linears: list[Linear], norms: list[Norm], embeddings: list[Embedding]
                         ) -> ResidualStream | None:
    start = _stream_start(embeddings, graph)
    if start is None:
        return None
    width = int(const_array(start.table).shape[1])
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    emb_by_output = {e.output: e for e in embeddings}
    norm_of_input = {n.input: n for n in norms}
    norm_nodes = {node: n for n in norms for node in n.nodes}
    stream = ResidualStream(width, [start.output], [], [start], [], [], [], None, None, True)
    value = start.output
    for _ in range(10_000):
        nxt = None
        aliases = _cast_aliases(value)  # float→float Casts of a stream tensor are the same stream tensor
        stream.values.extend(aliases[1:])
        readers = [(u, i) for a in aliases for u, i in _data_readers(a) if u not in (a.producer() for a in aliases[1:])]
        for user, index in readers:
            if user in norm_nodes and norm_nodes[user].input in aliases:
                norm = norm_nodes[user]
                if norm not in stream.norms:
                    stream.norms.append(norm)
                continue
            if user.op_type == "Add" and len(user.inputs) == 2 and const_array(user.inputs[1 - index]) is None:
                other = user.inputs[1 - index]
                if other in by_output:
                    stream.writers.append(by_output[other])
                elif other in emb_by_output:
                    stream.embeddings.append(emb_by_output[other])
                else:
                    stream.problems.append(f"Add '{user.name}' adds '{other.name}', which no linear layer or "
                                           "embedding writes, into the stream")
                if nxt is not None:
                    stream.problems.append(f"the stream forks at '{value.name}'")
                nxt = user
                continue
            direct = [lin for a in aliases for lin in by_input.get(a, []) if lin.node is user]
            if direct:
                stream.readers.append(direct[0])
                continue
            stream.problems.append(f"'{value.name}' is read by {user.op_type} '{user.name}' (neither a norm, "
                                   "a residual Add nor a linear layer)")
        if any(a.is_graph_output() for a in aliases):
            stream.problems.append(f"stream tensor '{value.name}' is a graph output")
        if nxt is not None:
            stream.adds.append(nxt)
            value = nxt.outputs[0]
            stream.values.append(value)
            continue
        # no residual Add: the stream may pass through a (post-)norm whose output carries on
        post = next((norm_of_input[a] for a in aliases if a in norm_of_input), None)
        if post is not None and any(u.op_type == "Add" for u, _ in _data_readers(post.output)):
            stream.pre_norm = False
            stream.values.append(post.output)
            value = post.output
            continue
        break
    # readers of the norms' outputs; the final norm is the one after the last residual Add
    for norm in stream.norms:
        users = _data_readers(norm.output)
        for user, _ in users:
            lin = next((lin for lin in by_input.get(norm.output, []) if lin.node is user), None)
            if lin is not None:
                if lin not in stream.readers:
                    stream.readers.append(lin)
            elif not (not stream.pre_norm and user.op_type == "Add"):
                stream.problems.append(f"norm '{norm.name}' output is read by {user.op_type} '{user.name}', "
                                       "not a linear layer")
        if norm.output.is_graph_output():
            stream.final_norm = norm
            stream.problems.append(f"norm '{norm.name}' output is a graph output (the model returns hidden states)")
    if stream.norms and stream.norms[-1].input in stream.values[-3:]:
        stream.final_norm = stream.norms[-1]
    if stream.final_norm is not None:
        heads = [lin for lin in by_input.get(stream.final_norm.output, []) if _feeds_output(lin.output)]
        stream.lm_head = heads[0] if len(heads) == 1 else None
    if not stream.pre_norm:
        in_stream = [n for n in stream.norms if n.output in stream.values]
        stream.problems.insert(0, f"post-norm: {len(in_stream)} norms ({in_stream[0].form}) sit on the residual stream, "
                                  "so their γ/β reach the stream itself and cannot be folded away; a rotation R "
                                  "would need γ⊙(x̂R) + β = (γ⊙x̂ + β)R, which holds only for γ constant and β "
                                  "a multiple of R's fixed vector")
    return stream


def _cast_aliases(value: ir.Value) -> list[ir.Value]:
    """`value` and the outputs of the float→float Casts / Identities that read it (recursively)."""
    out, i = [value], 0
    while i < len(out):
        for user in out[i].consumers():
            if (_is_float_cast(user) or user.op_type in _PASS_THROUGH) and user.outputs[0] not in out:
                out.append(user.outputs[0])
        i += 1
    return out


def _feeds_output(value: ir.Value, depth: int = 4) -> bool:
    for _ in range(depth):
        if value.is_graph_output():
            return True
        user = _sole_reader(value)
        if user is None or user.op_type not in ("Cast", "Reshape", "Identity", "Squeeze", "Transpose"):
            return False
        value = user.outputs[0]
    return value.is_graph_output()


# ----------------------------------------------------------------------------------------------------
# entry points


def analyse(model: ir.Model) -> Structure:
    """Everything this module recognises in `model` (read-only)."""
    s = Structure()
    graph = model.graph
    s.linears = find_linears(graph)
    s.norms = find_norms(model, s.rejected)
    s.attentions = find_attentions(graph, s.linears, s.norms, s.rejected)
    s.mlps = find_mlps(model, s.linears, s.rejected)
    s.embeddings = find_embeddings(graph)
    s.stream = find_residual_stream(graph, s.linears, s.norms, s.embeddings)
    if s.stream is not None:
        s.lm_head = s.stream.lm_head
    return s


def is_transformer(model: ir.Model) -> bool:
    """True when the graph has attention (Softmax between two activation MatMuls, fed by projections)
    and at least one norm. Cheap: no pattern search beyond what those two need."""
    if not any(n.op_type == "Softmax" for n in model.graph):
        return False
    if not find_softmaxes(model):
        return False
    return bool(find_norms(model))


def norms_by_output(norms: Iterable[Norm]) -> dict[ir.Value, Norm]:
    return {n.output: n for n in norms}


# ----------------------------------------------------------------------------------------------------
# editing helpers shared by the passes (recognition above never edits the graph)


def set_weight_io(graph: ir.Graph, namer, lin: Linear, w_io: np.ndarray) -> None:
    """Store `w_io` ([in, out]) as `lin`'s weight, in its layout; a weight other nodes share is copied."""
    from onnxq.ir.graph import private_weight, replace_initializer

    value = private_weight(graph, namer, lin.node, 1)
    lin.weight = value
    w = np.asarray(w_io, dtype=np.float32)
    replace_initializer(value, np.ascontiguousarray(w.T if lin.transposed else w))


def set_bias(graph: ir.Graph, namer, lin: Linear, b: np.ndarray) -> None:
    """Give `lin` the bias `b`: edit the existing one (copied if shared), or add an Add after the layer."""
    from onnxq.ir.graph import add_initializer, private_weight, replace_initializer

    b = np.asarray(b, dtype=np.float32).reshape(-1)
    if lin.bias is not None:
        index = 2 if lin.bias_node is None else list(lin.bias_node.inputs).index(lin.bias)
        owner = lin.node if lin.bias_node is None else lin.bias_node
        value = private_weight(graph, namer, owner, index)
        lin.bias = value
        replace_initializer(value, b)
        return
    out = lin.node.outputs[0]
    base = lin.node.name or out.name or "linear"
    bias = add_initializer(graph, namer, f"{base}_bias", b)
    uses = list(out.uses())
    add = ir.node("Add", [out, bias], name=namer.fresh(f"{base}_bias_add"))
    add.outputs[0].name = namer.fresh(f"{out.name}_biased")
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(lin.node, add)
    for node, index in uses:
        node.replace_input_with(index, add.outputs[0])
    if out.is_graph_output():
        _swap_graph_output(graph, out, add.outputs[0])
    lin.bias, lin.bias_node = bias, add


def _swap_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    for i, o in enumerate(graph.outputs):
        if o is old:
            name = old.name
            old.name = f"{name}_inner"
            new.name = name
            graph.outputs[i] = new


def insert_elementwise(graph: ir.Graph, namer, value: ir.Value, op_type: str, constant: np.ndarray, base: str,
                       readers: list[tuple[ir.Node, int]] | None = None) -> ir.Node:
    """Insert `op_type`(value, constant) and move `readers` (default: all readers of `value`) onto its output."""
    from onnxq.ir.graph import add_initializer

    readers = list(value.uses()) if readers is None else readers
    const = add_initializer(graph, namer, f"{base}_{op_type.lower()}_by", np.asarray(constant, dtype=np.float32))
    node = ir.node(op_type, [value, const], name=namer.fresh(f"{base}_{op_type}"))
    node.outputs[0].name = namer.fresh(f"{value.name}_{op_type.lower()}")
    node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
    for user, index in readers:
        user.replace_input_with(index, node.outputs[0])
    return node


def rename(value: ir.Value | None, suffix: str, namer=None) -> None:
    """Mark a tensor whose values a pass changed (never a graph input or output, whose names are API)."""
    if value is None or value.is_graph_output() or value.is_graph_input() or not value.name:
        return
    if not value.name.endswith(suffix):
        new = f"{value.name}{suffix}"
        value.name = namer.fresh(new) if namer is not None else new
