"""qfpe: swap a PETR position embedding for FQ-PETR's QFPE, with a fine-tuned model's weights.

Kind: needs-retraining. QFPE (FQ-PETR) replaces PETR's 64-depth LID frustum, its inverse sigmoid and
192-channel encoder input by one ray point per feature cell at a fixed LiDAR-prior depth, embedded per
axis as a convex combination of 3 learned anchors: the PE stays bounded and needs no Log. Its anchors
and encoder, and in practice every other weight of the detector, come from fine-tuning with labels: a
graph pass cannot produce them, so this pass reads them from a QFPE weights file (`checkpoint`: plain
arrays, never a pickle; qfpe_data.py describes it, onnxq_models.petr_export.write_qfpe_weights writes
it). A relative `checkpoint` in a recipe file is taken from that file's folder.

What it does, on a form-A graph (PE computed in the graph from img2lidar; onnxq.analysis.petr_pe finds
it, before any file is read):

1. The PE subgraph up to its 1×1-conv encoder output (B·N, E, H, W) is replaced by the QFPE
   subgraph, authored here as onnx_ir nodes with the file's anchors and encoder:
   ray points (H·W, 4) at the prior depth → lidar frame through img2lidar → normalise by the position
   range → Clip(0, 1)·(n_anchors - 1) = t → hat weights Relu(1 - |t - k|) → per axis Gather and the
   weighted sum of that axis's anchor table → Concat → Reshape/Transpose → Conv 1×1 → Relu → Conv 1×1. The same
   operations as onnxq_models.petr's QFPEPositionEmbedding (tests/test_petr_passes.py checks the two agree).
   The lidar-frame points are written, by default (`float_geometry`), as the 4-term sum
   Σ_j ray[:, j] · img2lidar[..., :3, j] of broadcast Mul/Add instead of a MatMul: per-tensor INT8
   quantizers quantize every MatMul, and a per-tensor INT8 img2lidar rounds its 1/focal entries
   (~0.004) to zero, which destroys the geometry. As elementwise ops the multiply-adds stay in float
   (TensorRT runs them in FP32). The anchor interpolation Σ_k w_k·anchor_k is written the same way,
   for the same reason: as a MatMul, INT8 hat weights (steps of 1/127) and anchor tables lose most of
   the geometry's resolution; as 3 Mul/Add per axis it stays float and the encoder's 1×1 convs after it
   are quantized as usual.
2. With `load_weights` (default), every other weight is loaded "by name": the file holds every
   constant of the fine-tuned model's export by the repository's exporter (form A), and each float
   constant input of a node of this graph is replaced by the constant at the same input of the node
   with the same name in that export (scoped node names carry the module path, e.g.
   /model/layers.0/cross_attn/k_proj/MatMul); constants of other nodes (the exporter's unscoped
   Identity_84 counters differ between exports) are matched by initializer name (query_pos,
   model.layers.0.norm1.weight). Run it first in a recipe, on the exporter's graph,
   so that node names are the exporter's. A weighted node (Conv, MatMul, Gemm, LayerNormalization)
   left without a counterpart means the weights do not fit the graph: the pass fails.
   The fine-tuned model differs everywhere, so the result is the QFPE model itself.
3. Validation: with calibration data, the rewritten graph is run on the file's reference evaluation
   (camera matrices and images the PyTorch model was run on when the file was written): the
   authored PE against the PyTorch QFPE module's, and (with load_weights) the outputs against the
   PyTorch model's; a relative difference above `tolerance` is an error. Both are in the summary.

Every tensor whose value changes is renamed `<name>_qfpe` (graph outputs keep their names), so
`onnxq compare` never pairs the LID and QFPE models' intermediate tensors. A form-B graph (PE as an
input) needs no pass: compute pos_embed with the QFPE module outside (onnxq_models.petr_export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.analysis.petr_pe import find_pe, stats
from onnxq.errors import OnnxqError
from onnxq.ir.graph import WEIGHTED_OPS, Namer, add_initializer, const_array
from onnxq.passes.petr.qfpe_data import QfpeWeights, read_qfpe_weights
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext, before_quantize

_WEIGHTED = set(WEIGHTED_OPS) | {"LayerNormalization"}


@dataclass(frozen=True)
class Qfpe(GraphPass):
    name: ClassVar[str] = "qfpe"
    kind: ClassVar[Kind] = Kind.RETRAIN

    checkpoint: str = option("", path=True)  # a QFPE weights file (.npz, onnxq_models.petr_export.write_qfpe_weights)
    load_weights: bool = True     # also load every other fine-tuned weight by name (the QFPE model itself)
    float_geometry: bool = True   # ray projection and anchor interpolation as Mul/Add (float under INT8), not MatMul
    pe_input: str = ""            # the camera-matrix input, if the recognition is ambiguous
    tolerance: float = option(1e-4, low=0.0)  # relative difference allowed against the PyTorch module / model

    def requires(self, model: ir.Model) -> None:
        before_quantize(self, model)

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        # the model must be a PETR with its PE in the graph before any file is opened
        site = find_pe(model, self.pe_input or None)
        if site.form != "in_graph":
            raise OnnxqError(f"qfpe: the position embedding is the graph input '{site.source.name}'; compute it with the QFPE "
                             "module outside the graph (onnxq_models.petr_export.compute_pos_embed) instead")
        path = resolve_checkpoint(self.checkpoint)
        weights = read_qfpe_weights(path)
        if weights.pe_type != "qfpe":
            raise OnnxqError(f"qfpe: {path} is a '{weights.pe_type}' checkpoint; give a QFPE one (pe_type 'qfpe')")
        old = site.encoder_output
        fh, fw = weights.meta["feat_hw"]
        embed_dims = weights.meta["embed_dims"]
        if old.shape is None or [d if isinstance(d, int) else None for d in old.shape][1:] != [embed_dims, fh, fw]:
            raise OnnxqError(f"qfpe: the graph's PE encoder gives {list(old.shape or [])}, the checkpoint's QFPE "
                             f"gives (B·N, {embed_dims}, {fh}, {fw})")
        graph, namer = model.graph, Namer(model.graph)
        params = weights.pe_parameters()
        new_nodes, new_pe = build_qfpe(graph, namer, site.source, params, self.float_geometry,
                                       prefix="/model/position_embedding_qfpe")
        first_reader = min((u for u, _ in old.uses()), key=list(graph).index)
        graph.insert_before(first_reader, new_nodes)
        new_pe.name = namer.fresh(f"{old.name}_qfpe")
        new_pe.dtype, new_pe.shape = old.dtype, old.shape
        old.replace_all_uses_with(new_pe)
        RemoveUnusedNodesPass()(model)  # the old PE subgraph
        summary = {"pe_replaced": f"{site.pe_type} -> qfpe", "pe_nodes_removed": len(site.nodes),
                   "pe_nodes_added": len(new_nodes), "checkpoint": str(self.checkpoint)}
        changed = [new_pe]
        if self.load_weights:
            loaded, unmatched, readers = load_weights_by_name(model, weights, set(new_nodes))
            summary["weights_loaded"] = loaded
            if unmatched:
                summary["constants_unmatched"] = len(unmatched)
            changed += [n.outputs[0] for n in readers]
        renamed = _rename_downstream(graph, changed, keep={new_pe})
        summary["tensors_renamed"] = renamed
        if ctx.calibration is not None and weights.check_feed() is not None:
            summary.update(self._validate(model, weights, site.source, new_pe.name))
        return summary

    def _validate(self, model: ir.Model, weights: QfpeWeights, source: ir.Value, pe_name: str) -> dict:
        """The authored PE, and (with load_weights) the whole graph, against the PyTorch model's
        reference evaluation stored in the weights file."""
        from onnxq.runtime.session import exposing, session

        images, inv = weights.check_feed()
        others = [v for v in model.graph.inputs if v is not source]
        if len(others) != 1 or not _fits(others[0], images.shape) or not _fits(source, inv.shape):
            # not the exporter's (images, img2lidar) interface: check the authored subgraph on its own
            num_cameras = weights.meta["num_cameras"]
            pe_model = qfpe_pe_model(weights.pe_parameters(), num_cameras, self.float_geometry, batch=inv.shape[0])
            values = {pe_name: session(pe_model).run(None, {"img2lidar": inv})[0]}
            outputs = []
        else:
            sess = session(exposing(model, [pe_name]))
            outputs = [o.name for o in sess.get_outputs()]
            values = dict(zip(outputs, sess.run(outputs, {source.name: inv, others[0].name: images})))
        ref_pe = weights.arrays["check.pe"]
        result = {"pe_vs_pytorch_rel": _rel(values[pe_name], ref_pe)}
        if result["pe_vs_pytorch_rel"] > self.tolerance:
            raise OnnxqError(f"qfpe: the authored QFPE subgraph differs from the PyTorch QFPE module by "
                             f"{result['pe_vs_pytorch_rel']:.2e} relative (tolerance {self.tolerance:.0e})")
        result["pe_absmax"] = round(stats(ref_pe)["absmax"], 3)
        reference = weights.check_outputs()
        if self.load_weights and len(outputs) >= len(reference) + 1:
            rel = max(_rel(values[name], ref) for name, ref in zip(outputs, reference))
            result["model_vs_pytorch_rel"] = rel
            if rel > 10 * self.tolerance:
                raise OnnxqError(f"qfpe: the rewritten graph differs from the PyTorch QFPE model by {rel:.2e} relative: "
                                 "the checkpoint's weights did not all land (does the graph come from models/petr_export.py?)")
        for key in ("pe_vs_pytorch_rel", "model_vs_pytorch_rel"):
            if key in result:
                result[key] = float(f"{result[key]:.3g}")
        return result


def resolve_checkpoint(path: str) -> Path:
    """The weights file `path` names: the recipe loader has already made a path that a recipe file
    gives relative to its own folder (built-in recipes name the files shipped beside them); a
    recipe given as a Python list or on the command line is read from the working directory."""
    if not path:
        raise OnnxqError("qfpe needs a QFPE weights file: option `checkpoint` (a .npz written by "
                         "onnxq_models.petr_export.write_qfpe_weights)")
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise OnnxqError(f"qfpe: checkpoint {path} not found")
    return candidate


def _fits(value: ir.Value, shape: tuple[int, ...]) -> bool:
    """True if an array of `shape` can be fed to graph input `value` (same rank, equal static dims)."""
    if value.shape is None or len(value.shape) != len(shape):
        return False
    return all(not isinstance(d, int) or d == s for d, s in zip(value.shape, shape))


def build_qfpe(graph: ir.Graph, namer: Namer, img2lidar: ir.Value, p: dict[str, np.ndarray], float_geometry: bool = True,
               prefix: str = "/qfpe") -> tuple[list[ir.Node], ir.Value]:
    """The QFPE subgraph from img2lidar (B, N, 4, 4) to the encoder output (B·N, E, H, W): its nodes (not yet
    in the graph; their constants are registered as initializers) and its output."""
    nodes: list[ir.Node] = []

    def const(name, array, dtype=np.float32):
        return add_initializer(graph, namer, f"{prefix}/{name}", np.asarray(array, dtype=dtype))

    def op(op_type, *inputs, name, **attributes):
        node = ir.node(op_type, list(inputs), attributes or None, name=namer.fresh(f"{prefix}/{name}"))
        node.outputs[0].name = namer.fresh(f"{prefix}/{name}_output")
        node.outputs[0].dtype = ir.DataType.FLOAT
        nodes.append(node)
        return node.outputs[0]

    fh, fw = (int(v) for v in p["feat_hw"])
    rays = p["ray_points"]  # (H·W, 4): (u·d, v·d, d, 1) per cell, row-major over (h, w)
    num_anchors, anchor_dims = p["anchors"].shape[1:]
    mt = op("Transpose", img2lidar, name="img2lidar_t", perm=[0, 1, 3, 2])  # [..., j, i] = img2lidar[..., i, j]
    if float_geometry:
        mt3 = op("Slice", mt, const("xyz_start", [0], np.int64), const("xyz_end", [3], np.int64),
                 const("xyz_axis", [3], np.int64), name="img2lidar_xyz")  # (B, N, 4, 3)
        points = None
        for j in range(4):
            col = op("Slice", mt3, const(f"col{j}_start", [j], np.int64), const(f"col{j}_end", [j + 1], np.int64),
                     const(f"col{j}_axis", [2], np.int64), name=f"img2lidar_col{j}")  # (B, N, 1, 3)
            term = col if j == 3 and np.all(rays[:, 3] == 1) else \
                op("Mul", const(f"ray_coord{j}", rays[:, j:j + 1]), col, name=f"ray_term{j}")  # (B, N, H·W, 3)
            points = term if points is None else op("Add", points, term, name=f"ray_sum{j}")
    else:
        full = op("MatMul", const("ray_points", rays), mt, name="ray_points_lidar")  # (B, N, H·W, 4)
        points = op("Slice", full, const("xyz_start", [0], np.int64), const("xyz_end", [3], np.int64),
                    const("xyz_axis", [3], np.int64), name="ray_points_xyz")
    norm = op("Div", op("Sub", points, const("range_min", p["range_min"]), name="shift"),
              const("range_span", p["range_span"]), name="normalised")
    t = op("Mul", op("Clip", norm, const("zero", 0.0), const("one", 1.0), name="clip"),
           const("last_anchor", float(num_anchors - 1)), name="anchor_coord")
    dist = op("Abs", op("Sub", op("Unsqueeze", t, const("last_axis", [-1], np.int64), name="anchor_coord_unsq"),
                        const("anchor_positions", p["anchor_positions"]), name="anchor_offset"), name="anchor_distance")
    weights = op("Relu", op("Sub", const("hat_one", 1.0), dist, name="hat"), name="interp_weights")  # (B, N, H·W, 3, nA)
    parts = []
    for axis, name in enumerate("xyz"):
        w_axis = op("Gather", weights, const(f"axis{axis}", axis, np.int64), name=f"interp_weights_{name}", axis=3)
        anchors = p["anchors"][axis]  # (nA, A)
        if not float_geometry:
            parts.append(op("MatMul", w_axis, const(f"anchors_{name}", anchors), name=f"anchor_embedding_{name}"))
            continue
        emb_axis = None  # Σ_k w_k · anchor_k as broadcast Mul/Add: stays float, like the ray projection
        for k in range(len(anchors)):
            w_k = op("Slice", w_axis, const(f"w{name}{k}_start", [k], np.int64), const(f"w{name}{k}_end", [k + 1], np.int64),
                     const(f"w{name}{k}_axis", [-1], np.int64), name=f"interp_weight_{name}{k}")  # (B, N, H·W, 1)
            term = op("Mul", w_k, const(f"anchor_{name}{k}", anchors[k]), name=f"anchor_term_{name}{k}")
            emb_axis = term if emb_axis is None else op("Add", emb_axis, term, name=f"anchor_sum_{name}{k}")
        parts.append(emb_axis)
    emb = op("Concat", *parts, name="anchor_embedding", axis=-1)  # (B, N, H·W, 3A)
    grid = op("Reshape", emb, const("grid_shape", [-1, fh, fw, 3 * anchor_dims], np.int64), name="anchor_grid")
    x = op("Transpose", grid, name="anchor_maps", perm=[0, 3, 1, 2])  # (B·N, 3A, H, W)
    h = op("Conv", x, const("encoder_0_weight", p["w1"]), const("encoder_0_bias", p["b1"]), name="encoder/encoder.0/Conv")
    h = op("Relu", h, name="encoder/encoder.1/Relu")
    pe = op("Conv", h, const("encoder_2_weight", p["w2"]), const("encoder_2_bias", p["b2"]), name="encoder/encoder.2/Conv")
    return nodes, pe


def qfpe_pe_model(params: dict[str, np.ndarray], num_cameras: int, float_geometry: bool = True,
                  batch: int = 1) -> ir.Model:
    """A standalone model img2lidar (batch, N, 4, 4) -> QFPE encoder output (batch·N, E, H, W) from the
    PE arrays (`QfpeWeights.pe_parameters`)."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 17}, name="qfpe")
    source = ir.Value(name="img2lidar", shape=ir.Shape([batch, num_cameras, 4, 4]),
                      type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(source)
    nodes, pe = build_qfpe(graph, Namer(graph), source, params, float_geometry)
    graph.extend(nodes)
    pe.name = "pe"
    graph.outputs.append(pe)
    return ir.Model(graph, ir_version=10)


def load_weights_by_name(model: ir.Model, weights: QfpeWeights, skip: set[ir.Node]) -> tuple[int, list[str], list[ir.Node]]:
    """Load the checkpoint model's weights into `model` by node name and input slot (see the module
    docstring). Returns (constants replaced, unmatched float constants, nodes whose inputs changed)."""
    graph, namer = model.graph, Namer(model.graph)
    cache: dict[str, ir.Value] = {}
    loaded, unmatched, readers, missing_weights = 0, [], [], []
    for node in list(graph):
        if node in skip:
            continue
        # scoped names (/model/layers.0/cross_attn/k_proj/MatMul) carry the module path; the exporter's
        # unscoped ones (Identity_84) are counters that differ between exports
        scoped = (node.name or "").startswith("/")
        for i, value in enumerate(node.inputs):
            array = const_array(value)
            if array is None or array.dtype.kind != "f":
                continue
            key = weights.node_constant(node.name, node.op_type, i) if scoped else None
            if key is None and value.name and not value.name.startswith("onnx::"):
                key = weights.initializer(value.name)
            if key is None:
                unmatched.append(f"{node.name}:{i}")
                if node.op_type in _WEIGHTED:
                    missing_weights.append(f"{node.name} input {i}")
                continue
            ref_array = weights.arrays[key]
            if ref_array.shape != array.shape:
                raise OnnxqError(f"qfpe: the checkpoint's {node.name} input {i} has shape {ref_array.shape}, the graph's "
                                 f"{array.shape}: the checkpoint does not fit this graph")
            if np.array_equal(ref_array, array):
                continue
            new = cache.get(key)
            if new is None:
                new = cache[key] = add_initializer(graph, namer, f"{value.name}_qfpe", ref_array.astype(array.dtype))
            node.replace_input_with(i, new)
            loaded += 1
            if node not in readers:
                readers.append(node)
    if missing_weights:
        raise OnnxqError(f"qfpe: no checkpoint weight for {len(missing_weights)} weighted input(s), e.g. "
                         f"{', '.join(missing_weights[:3])}: the checkpoint does not fit this graph (run qfpe first in the "
                         "recipe, on a graph from models/petr_export.py)")
    return loaded, unmatched, readers


def _rename_downstream(graph: ir.Graph, changed: list[ir.Value], keep: set[ir.Value]) -> int:
    """Rename (suffix _qfpe) every computed tensor downstream of `changed`, graph outputs excepted."""
    seen: set[ir.Value] = set()
    stack = list(changed)
    count = 0
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value not in keep and not value.is_graph_output() and value.name and not value.name.endswith("_qfpe"):
            value.name = f"{value.name}_qfpe"
            count += 1
        for user in value.consumers():
            stack.extend(user.outputs)
    return count


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
