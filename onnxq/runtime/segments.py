"""Running a large model one segment at a time, so that memory holds one segment, not the whole model.

A whole-graph ONNX Runtime session holds a copy of every weight (its pre-packed MatMul operands), and
with intermediate tensors exposed as outputs it returns all of them for a batch at once: both grow
with depth. `SegmentedModel` cuts the graph, in its topological order, into consecutive segments of
about `budget_bytes` of weights each. A run goes segment by segment over all batches and keeps,
between segments, only the tensors that cross the cut (in a decoder stack: the residual stream and the
shared mask and position tensors), one set per batch. Peak memory is one segment's session plus the
crossing tensors of every batch, whatever the depth; the arithmetic is the same as the whole graph's
(ONNX Runtime may fuse differently at a cut, so values agree to float rounding, not bit for bit).

Small models (below SEGMENT_THRESHOLD_BYTES of weights) and graphs with control flow (If, Loop, Scan:
their bodies read outer values implicitly) run whole, as before.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.ir.modelio import LARGE_TENSOR_BYTES, to_proto_without_weights, weight_bytes
from onnxq.runtime.session import ARRAY_TYPES, DetachedModel, session

SEGMENT_THRESHOLD_BYTES = 256 << 20  # models with more weights than this run in segments
SEGMENT_BUDGET_BYTES = 128 << 20  # weights per segment

_WEIGHT_BYTES = 4096  # an initializer at least this large is a weight (smaller: a constant a layer reads)

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Segment:
    """Consecutive nodes of the graph and what they exchange with the rest of it."""

    nodes: tuple[onnx.NodeProto, ...]
    inputs: tuple[str, ...]  # read from the feed or from an earlier segment
    outputs: tuple[str, ...]  # read by a later segment, asked for, or a model output
    initializers: tuple[str, ...]


@dataclass
class Resume:
    """The tensors entering one segment on every batch, left by a run for the next run of the same
    model state and batches (SegmentedModel.runs); `cuts` identifies the segmentation."""

    cuts: tuple[str, ...] = ()
    segment: int = 0
    carried: list[dict[str, np.ndarray]] | None = None  # one dict per batch


def worth_segmenting(model: ir.Model, threshold_bytes: int | None = None) -> bool:
    """Whether `model` has more than `threshold_bytes` (default SEGMENT_THRESHOLD_BYTES) of weights, so
    runs in segments, and can (no control-flow bodies)."""
    threshold = SEGMENT_THRESHOLD_BYTES if threshold_bytes is None else threshold_bytes
    return weight_bytes(model) > threshold and not any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for node in model.graph
        for attr in node.attributes.values())


class SegmentedModel:
    """`model` cut into segments of about `budget_bytes` of weights (default SEGMENT_BUDGET_BYTES) that
    hand on the tensors `wanted` (besides the model's outputs). `proto` and `weights`: the model as
    to_proto_without_weights gives it, when the caller has changed it (the calibrator trials declare
    their Q/DQ parameters as graph inputs, fed per trial)."""

    def __init__(self, model: ir.Model, wanted: Sequence[str] = (), *, budget_bytes: int | None = None,
                 proto: onnx.ModelProto | None = None, weights: Mapping[str, ir.TensorProtocol] | None = None):
        if proto is None:
            proto, weights = to_proto_without_weights(model, min_bytes=LARGE_TENSOR_BYTES,
                                                      keep=lambda t: t.dtype not in ARRAY_TYPES)
        self.proto, self.weights = proto, dict(weights or {})
        self.wanted = list(dict.fromkeys(wanted))
        self.segments = _plan(proto, self.wanted, SEGMENT_BUDGET_BYTES if budget_bytes is None else budget_bytes)
        self._stage = {i.name: -1 for i in proto.graph.input}
        self._stage.update((n, k) for k, segment in enumerate(self.segments) for n in segment.outputs)
        self.types = _element_types(proto)
        crossing = {n for s in self.segments for n in (*s.inputs, *s.outputs)}
        if not crossing <= self.types.keys():  # a tensor the IR left untyped: ONNX's inference types it
            self.types = _element_types(onnx.shape_inference.infer_shapes(proto))
            if not crossing <= self.types.keys():
                missing = sorted(crossing - self.types.keys())[:3]
                raise ValueError(f"cannot run in segments: no element type known for {', '.join(missing)}")

    def stage_of(self, name: str) -> int:
        """The index of the segment that produces `name`; -1 for a graph input (given with the feed)."""
        if name in self._stage:
            return self._stage[name]
        raise KeyError(f"'{name}' is neither a graph input nor a tensor the segments hand on")

    def runs(self, batches: Iterable[Feed], *, threads: int = 0,
             resume: Resume | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(segment index, batch index, the wanted tensors that segment produced for that batch), segment
        after segment up to the last one that produces a wanted tensor; wanted graph inputs come first,
        as segment -1.

        Each segment's session exists only while its batches run; the tensors crossing into later
        segments are kept per batch and dropped when no later segment reads them. `resume`: where an
        earlier run of the same model state on the same batches stopped; a run whose wanted tensors all
        come at or after that point starts there instead of at the first segment, and leaves `resume`
        at its own last segment (GPTQ's Hessians, collected a group of layers per run, so cost one pass
        in all, not one per group)."""
        batches = batches if isinstance(batches, Sequence) else list(batches)
        wanted = set(self.wanted)
        given = [n for n in self.wanted if self._stage.get(n) == -1]
        if given:
            for b, feed in enumerate(batches):
                yield -1, b, {n: feed[n] for n in given if n in feed}
        start, last = self.span(resume, len(batches))
        carried = [dict(c) for c in resume.carried] if start else [{} for _ in batches]
        cuts = self._cuts()
        later_reads = _later_reads(self.segments)
        for k in range(start, last + 1):
            segment = self.segments[k]
            if resume is not None and k == last:
                resume.cuts, resume.segment, resume.carried = cuts, k, [dict(c) for c in carried]
            sess = self._session(segment, threads)
            for b, feed in enumerate(batches):
                inputs = {n: carried[b][n] if n in carried[b] else feed[n] for n in segment.inputs
                          if n in carried[b] or n in feed}
                try:
                    values = dict(zip(segment.outputs, sess.run(list(segment.outputs), inputs)))
                except Exception as exc:  # ORT raises its own exception types for bad feeds
                    raise OnnxqError(f"ONNX Runtime failed on a batch: {str(exc).splitlines()[0]}") from None
                carried[b] = {n: v for n, v in {**carried[b], **values}.items() if n in later_reads[k]}
                yield k, b, {n: v for n, v in values.items() if n in wanted}
            del sess

    def span(self, resume: Resume | None = None, batches: int | None = None) -> tuple[int, int]:
        """(first, last) segment a run goes through: from `resume`'s segment where it serves, else the
        first, to the last that produces a wanted tensor; (0, -1) when segments produce none."""
        stages = [self._stage[n] for n in self.wanted if self._stage.get(n, -1) >= 0]
        if not stages:
            return 0, -1
        usable = (resume is not None and resume.cuts == self._cuts() and resume.carried is not None
                  and resume.segment <= min(stages) and (batches is None or len(resume.carried) == batches))
        return (resume.segment if usable else 0), max(stages)

    def _cuts(self) -> tuple[str, ...]:
        return tuple(segment.nodes[0].name for segment in self.segments)

    def collect(self, batches: Iterable[Feed], *, threads: int = 0) -> list[dict[str, np.ndarray]]:
        """The wanted tensors of every batch, in the order `wanted` names them (all batches held at once)."""
        batches = batches if isinstance(batches, Sequence) else list(batches)
        result: list[dict[str, np.ndarray]] = [{} for _ in batches]
        for _, b, values in self.runs(batches, threads=threads):
            result[b].update(values)
        return [{n: r[n] for n in self.wanted if n in r} for r in result]

    def _session(self, segment: Segment, threads: int) -> ort.InferenceSession:
        proto = onnx.ModelProto()  # the skeleton's header; its graph is built from the segment's part
        for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
            setattr(proto, field, getattr(self.proto, field))
        proto.opset_import.extend(self.proto.opset_import)
        proto.functions.extend(self.proto.functions)
        graph = proto.graph
        graph.name = "segment"
        graph.node.extend(segment.nodes)
        initializers = {t.name: t for t in self.proto.graph.initializer}
        graph.initializer.extend(initializers[n] for n in segment.initializers)
        graph.input.extend(self._value_info(n) for n in segment.inputs)
        graph.output.extend(self._value_info(n) for n in segment.outputs)
        held = {n: self.weights[n] for n in segment.initializers if n in self.weights}
        return session(DetachedModel(proto, held), threads=threads)

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, self.types[name], None)


def _plan(proto: onnx.ModelProto, wanted: Sequence[str], budget_bytes: int) -> list[Segment]:
    """Cut the node list wherever the weights a segment reads pass `budget_bytes`."""
    graph = proto.graph
    sizes = {t.name: _nbytes(t) for t in graph.initializer}
    initializer_names = set(sizes)
    graph_inputs = {i.name for i in graph.input}
    groups: list[list[onnx.NodeProto]] = [[]]
    held = 0
    seen: set[str] = set()
    for node in _topological(graph):
        fresh = [n for n in node.input if n in sizes and n not in seen]
        # once a segment is full, the cut goes before the next node that reads a weight: the tensors
        # crossing it are then the ones that feed a layer (the residual stream), not a layer's insides
        if held >= budget_bytes and any(sizes[n] >= _WEIGHT_BYTES for n in fresh):
            groups.append([])
            held = 0
            seen = set()  # a weight read again in a later segment is handed to that segment's session too
            fresh = [n for n in node.input if n in sizes]
        seen.update(fresh)
        held += sum(sizes[n] for n in fresh)
        groups[-1].append(node)
    groups = [g for g in groups if g]
    graph_outputs = [o.name for o in graph.output]
    reads_after = [set() for _ in groups]  # what segments after k read
    later: set[str] = set(graph_outputs) | set(wanted)
    for k in range(len(groups) - 1, -1, -1):
        reads_after[k] = set(later)
        later |= {n for node in groups[k] for n in node.input if n}
    segments = []
    for k, nodes in enumerate(groups):
        produced = {n for node in nodes for n in node.output if n}
        read = list(dict.fromkeys(n for node in nodes for n in node.input if n))
        # a graph input that is also an initializer (a default the feed may override) is both
        inputs = tuple(n for n in read if n not in produced and (n not in initializer_names or n in graph_inputs))
        outputs = tuple(n for node in nodes for n in node.output if n and n in reads_after[k])
        segments.append(Segment(tuple(nodes), inputs, outputs, tuple(n for n in read if n in initializer_names)))
    return segments


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an order where each comes after the producers of its inputs, as close to the stored
    order as that allows (a pass may append nodes whose readers come earlier; ORT sorts such graphs itself)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting_on = [{produced_by[n] for n in node.input if n in produced_by} for node in graph.node]
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting_on):
        for d in deps:
            readers.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(graph.node[i])
        for r in readers.get(i, ()):
            waiting_on[r].discard(i)
            if not waiting_on[r]:
                heapq.heappush(ready, r)
    if len(order) != len(graph.node):
        raise ValueError("cannot run in segments: the graph has a cycle")
    return order


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _later_reads(segments: Sequence[Segment]) -> list[set[str]]:
    """For each segment k, the names segments after k take as inputs (what must stay carried)."""
    result, later = [set() for _ in segments], set()
    for k in range(len(segments) - 1, -1, -1):
        result[k] = set(later)
        later |= set(segments[k].inputs)
    return result


def _element_types(proto: onnx.ModelProto) -> dict[str, int]:
    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]
             if v.type.HasField("tensor_type")}
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types
