"""Recognition of a PETR-family 3D position embedding (PE) in an ONNX graph.

PETR adds a camera-ray position embedding to the image features ("memory") to form the keys of
every cross-attention: K = (memory + pe)·W_k + b_k, while the values read the memory alone. The PE is
a function of the camera calibration only, so it reaches that Add from a graph input other than the
images, in one of two forms:

* form A ("in_graph"): the PE subgraph is in the graph, computed from a camera-matrix input
  (img2lidar, shape (B, N, 4, 4)) and constants, ending in PETR's 1×1-conv position encoder
  Conv → Relu → Conv. Its type is read from the ops feeding the encoder: PETR's inverse-sigmoid
  Log(Div(Clip(x, eps), Clip(1 - x, eps))) of the normalised frustum points ("lid"), FQ-PETR's
  anchor interpolation Relu(1 - |t - k|) ("qfpe"), or neither ("unknown");
* form B ("input"): the PE is itself a graph input (NVIDIA petr-trt moves it out of the engine),
  reaching the Add through data-movement ops only.

How it is found (no node names are relied on): every tensor is labelled with the set of graph inputs it
depends on. A PE site is an Add of two computed tensors that depend on disjoint inputs, one side
(the PE) on a single input `s` and the other (the memory) on the rest; the PE side must be either
data movement of `s` (form B) or the output of the 1×1 encoder computed from a (…, 4, 4) matrix input
(form A). A feature-guided PE (PETRv2's SE gate, pe · sigmoid(f(memory))) is recognised as a Mul on
the PE side whose other factor depends on the images: `gated` is set, and the PE is then not
constant for a fixed rig. Every Add that reads the same source is a site (the exporter merges
identical Adds of different layers into one; other exporters may not). For each Add, the readers
that are key projections (MatMul by a constant weight, optionally followed by an Add of a constant
bias) are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import attr, const_array, is_const
from onnxq.ir.linear import Linear
from onnxq.metadata import PE_KEY

DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand"})
_FLOAT = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


@dataclass
class AddSite:
    """One Add(memory, pe) and who reads its output."""

    add: ir.Node
    memory: ir.Value           # the image-feature operand
    pe: ir.Value               # the PE operand, as added (token-major for PETR)
    pe_index: int              # which input of `add` is the PE
    key_projections: list[Linear] = field(default_factory=list)
    other_readers: list[ir.Node] = field(default_factory=list)


@dataclass
class PESite:
    form: str                    # "in_graph" (A) or "input" (B)
    pe_type: str | None          # form A: "lid" | "qfpe" | "unknown"; form B: None (computed outside)
    source: ir.Value             # the graph input the PE depends on: img2lidar (A) or pos_embed (B)
    adds: list[AddSite]
    nodes: list[ir.Node]         # the nodes computing the PE operands from `source` (graph order)
    encoder: list[ir.Node] = field(default_factory=list)  # form A: [Conv, Relu, Conv] of the position encoder
    gated: bool = False          # a feature-dependent gate sits between the PE and the Add (PETRv2 FPE)
    gate: ir.Node | None = None

    @property
    def encoder_output(self) -> ir.Value | None:
        return self.encoder[-1].outputs[0] if self.encoder else None

    @property
    def key_projections(self) -> list[Linear]:
        return [k for a in self.adds for k in a.key_projections]

    def describe(self) -> str:
        where = {"in_graph": f"computed in the graph from '{self.source.name}'",
                 "input": f"the graph input '{self.source.name}'"}[self.form]
        kind = f" ({self.pe_type} PE)" if self.pe_type else ""
        gate = ", gated by the image features" if self.gated else ""
        return (f"PETR position embedding{kind}, {where}{gate}: {len(self.nodes)} nodes, added to the image features "
                f"by {len(self.adds)} Add node(s) feeding {len(self.key_projections)} key projection(s)")

    def summary(self) -> dict:
        return {"form": self.form, "pe_type": self.pe_type or "input", "source": self.source.name,
                "pe_nodes": len(self.nodes), "adds": [a.add.name for a in self.adds],
                "key_projections": len(self.key_projections), "gated": self.gated}


# ---------------------------------------------------------------------------------------------


def input_dependencies(graph: ir.Graph) -> dict[ir.Value, frozenset[str]]:
    """For every tensor, the names of the graph inputs it depends on (constants depend on none)."""
    deps: dict[ir.Value, frozenset[str]] = {}
    for value in graph.inputs:
        deps[value] = frozenset() if value.is_initializer() else frozenset({value.name})
    empty = frozenset()
    for node in graph:  # topological order
        found = frozenset().union(*(deps.get(v, empty) for v in node.inputs if v is not None))
        for out in node.outputs:
            deps[out] = found
    return deps


def find_pe(model: ir.Model, pe_input: str | None = None) -> PESite:
    """The PE site of `model` (see the module docstring); OnnxqError when there is none."""
    graph = model.graph
    graph.sort()
    deps = input_dependencies(graph)
    inputs = {v.name: v for v in graph.inputs if not v.is_initializer()}
    if pe_input is not None and pe_input not in inputs:
        raise OnnxqError(f"the model has no input '{pe_input}' (inputs: {', '.join(inputs)})")
    candidates: dict[str, list[tuple[ir.Node, int, ir.Value, ir.Node | None]]] = {}
    for node in graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None or is_const(v) for v in node.inputs):
            continue
        for k in (0, 1):
            pe_side, mem_side = node.inputs[k], node.inputs[1 - k]
            found = _pe_side(pe_side, deps)
            if found is None:
                continue
            source_name, gate = found
            mem_deps = deps.get(mem_side, frozenset())
            if not mem_deps or source_name in mem_deps or (pe_input is not None and source_name != pe_input):
                continue
            candidates.setdefault(source_name, []).append((node, k, pe_side, gate))
    sites = []
    for source_name, adds in candidates.items():
        site = _classify(graph, inputs[source_name], adds, deps)
        if site is not None:
            sites.append(site)
    if not sites:
        raise OnnxqError("no PETR position embedding found: no Add of image features and a tensor computed only from "
                         "a camera-matrix input through a 1×1-conv position encoder, or from a PE graph input"
                         + (f" '{pe_input}'" if pe_input else ""))
    if len(sites) > 1:
        raise OnnxqError(f"several inputs look like a PETR position embedding ({', '.join(s.source.name for s in sites)}): "
                         "name the one to use (option pe_input)")
    return sites[0]


def _pe_side(value: ir.Value, deps) -> tuple[str, ir.Node | None] | None:
    """(source input name, gate node or None) when `value` depends on exactly one input, possibly
    through a feature gate Mul(pe, g(features))."""
    d = deps.get(value, frozenset())
    if len(d) == 1:
        return next(iter(d)), None
    # PETRv2's gate: walk back through data movement to a Mul whose one factor depends on one input
    node = value.producer()
    while node is not None and node.op_type in DATA_MOVEMENT:
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and node.op_type == "Mul" and len(node.inputs) == 2:
        for k in (0, 1):
            a, b = node.inputs[k], node.inputs[1 - k]
            da, db = deps.get(a, frozenset()), deps.get(b, frozenset())
            if len(da) == 1 and db and not (da & db):
                return next(iter(da)), node
    return None


def _classify(graph: ir.Graph, source: ir.Value, adds, deps) -> PESite | None:
    """Check the PE side of each Add against form A or B; None when it is neither."""
    sites, nodes, encoder, form, gate = [], set(), None, None, None
    for add, k, pe_side, gate_node in adds:
        start = pe_side
        if gate_node is not None:  # the PE proper is the gate's source-only factor
            gate = gate_node
            a, b = gate_node.inputs
            start = a if deps.get(a) == frozenset({source.name}) else b
        chain = _data_movement_chain(start)
        origin = chain[-1].inputs[0] if chain else start
        if origin is source:
            this_form, enc = "input", None
        else:
            enc = _encoder_before(origin)
            if enc is None or not _is_camera_matrix(source):
                return None
            this_form = "in_graph"
        if form is not None and this_form != form:
            return None
        form = this_form
        encoder = encoder or enc
        nodes |= set(chain) | _cone(start, source.name, deps)
        sites.append(AddSite(add, add.inputs[1 - k], pe_side, k))
    for site in sites:
        _readers(site)
    order = {n: i for i, n in enumerate(graph)}
    pe_type = None
    if form == "in_graph":
        pe_type = _pe_type(encoder[0].inputs[0], source.name, deps)
    return PESite(form, pe_type, source, sites, sorted(nodes, key=lambda n: order.get(n, 0)), encoder or [],
                  gated=gate is not None, gate=gate)


def _data_movement_chain(value: ir.Value) -> list[ir.Node]:
    """The data-movement nodes producing `value`, nearest first (their other inputs are shapes or axes:
    constants, or integer tensors computed from shapes)."""
    chain = []
    node = value.producer()
    while node is not None and node.op_type in DATA_MOVEMENT and node.inputs[0] is not None \
            and all(v is None or is_const(v) or v.dtype not in _FLOAT for v in node.inputs[1:]):
        chain.append(node)
        node = node.inputs[0].producer()
    return chain


def _cone(value: ir.Value, source: str, deps) -> set[ir.Node]:
    """Nodes computing `value` that depend on `source` only (constants' producers included)."""
    found: set[ir.Node] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or node in found or not deps.get(v, frozenset()) <= {source}:
            continue
        found.add(node)
        stack.extend(node.inputs)
    return found


def _is_1x1_conv(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Conv" or len(node.inputs) < 2:
        return False
    w = const_array(node.inputs[1])
    return w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and attr(node, "group", 1) == 1


def _encoder_before(value: ir.Value) -> list[ir.Node] | None:
    """[Conv1x1, Relu, Conv1x1] producing `value` (PETR's position encoder), else None."""
    conv2 = value.producer()
    if not _is_1x1_conv(conv2):
        return None
    relu = conv2.inputs[0].producer()
    if relu is None or relu.op_type != "Relu":
        return None
    conv1 = relu.inputs[0].producer()
    return [conv1, relu, conv2] if _is_1x1_conv(conv1) else None


def _is_camera_matrix(value: ir.Value) -> bool:
    dims = list(value.shape) if value.shape is not None else []
    return len(dims) >= 2 and dims[-2:] == [4, 4]


def _pe_type(encoder_input: ir.Value, source: str, deps) -> str:
    """"lid" for PETR's inverse sigmoid before the encoder, "qfpe" for FQ-PETR's anchor interpolation."""
    cone = _cone(encoder_input, source, deps)
    for node in cone:
        if node.op_type == "Log" and _is_inverse_sigmoid(node):
            return "lid"
    for node in cone:  # Relu(1 - |t - k|): the hat weights of linear interpolation between anchors
        if node.op_type == "Relu":
            sub = node.inputs[0].producer()
            if sub is not None and sub.op_type == "Sub" and sub.inputs[1] is not None \
                    and sub.inputs[1].producer() is not None and sub.inputs[1].producer().op_type == "Abs" \
                    and _scalar(sub.inputs[0]) == 1.0:
                return "qfpe"
    return "unknown"


def _is_inverse_sigmoid(log: ir.Node) -> bool:
    """Log(Div(clamp(x, eps), clamp(1 - x, eps))), clamps as Clip or Max (mmdet's inverse_sigmoid)."""
    div = log.inputs[0].producer()
    if div is None or div.op_type != "Div":
        return False
    num, den = (v.producer() if v is not None else None for v in div.inputs)
    if num is None or den is None or num.op_type not in ("Clip", "Max") or den.op_type not in ("Clip", "Max"):
        return False
    one_minus = den.inputs[0].producer()
    return one_minus is not None and one_minus.op_type == "Sub" and _scalar(one_minus.inputs[0]) == 1.0


def _scalar(value: ir.Value | None) -> float | None:
    a = const_array(value)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _readers(site: AddSite) -> None:
    """Sort the readers of the Add's output into key projections and others."""
    out = site.add.outputs[0]
    for node in out.consumers():
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        w = const_array(weight)
        if node.inputs[0] is out and w is not None and w.ndim == 2 and not out.is_graph_output():
            projection = Linear(node, weight)
            users = node.outputs[0].consumers()
            if len(users) == 1 and users[0].op_type == "Add" and not node.outputs[0].is_graph_output():
                for v in users[0].inputs:
                    b = const_array(v)
                    if v is not node.outputs[0] and b is not None and b.shape[-1:] == (w.shape[1],):
                        projection.bias, projection.bias_node = v, users[0]
            site.key_projections.append(projection)
        else:
            site.other_readers.append(node)


def tag_site(site: PESite) -> None:
    """Mark the PE nodes and the Adds in node metadata (Netron shows it; passes leave it alone)."""
    for node in site.nodes:
        node.metadata_props[PE_KEY] = f"{site.pe_type or 'input'} position embedding from '{site.source.name}'"
    for a in site.adds:
        a.add.metadata_props[PE_KEY] = (f"image features + position embedding, read by {len(a.key_projections)} "
                                        "key projection(s)")


def stats(x: np.ndarray) -> dict[str, float]:
    """absmax, 99.9th percentile of |x| and std: how the ranges of PE and features are reported."""
    a = np.abs(np.asarray(x, dtype=np.float64)).reshape(-1)
    return {"absmax": float(a.max(initial=0.0)), "p99.9": float(np.quantile(a, 0.999)) if a.size else 0.0,
            "std": float(np.asarray(x, dtype=np.float64).std()) if a.size else 0.0}
