"""The residual stream: the tensors from the token embedding through every residual Add, who writes
them, which norms and linear layers read them, the final norm, the LM head, and every reason a
rotation of the whole stream would not be exact (`ResidualStream.problems`).

A graph walk from the widest token-embedding Gather, following float Casts as aliases of the same
tensor; post-norm models (the stream passes through a norm whose output carries on) are recognised
and reported, since their γ/β sit on the stream itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.analysis.matching import cast_aliases, data_readers, skip_casts_back, sole_reader
from onnxq.analysis.norms import Norm
from onnxq.ir.graph import attr, is_traced_const, traced_const, traced_tensor
from onnxq.ir.linear import Linear


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
    writers: list[Linear]  # linears whose output is added into the stream (every expert's down projection of a MoE)
    norms: list[Norm]  # norms that read the stream
    readers: list[Linear]  # linears that read those norms' outputs (or the stream directly)
    final_norm: Norm | None
    lm_head: Linear | None
    pre_norm: bool
    problems: list[str] = field(default_factory=list)  # why rotating the stream would not be exact
    # constant tables added to the stream (learned position embeddings), each the initializer read by the Add
    # or by the Slice of its first rows the Add reads; a rotation rotates them like the token embedding
    position_tables: list[tuple[ir.Node, int]] = field(default_factory=list)  # (node reading the table, input index)

    @property
    def rotatable(self) -> bool:
        return not self.problems



_NUMPY_FLOATS = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)  # numpy's kind "f"


def find_embeddings(graph: ir.Graph) -> list[Embedding]:
    out = []
    for node in graph:
        if node.op_type != "Gather" or attr(node, "axis", 0) != 0 or len(node.inputs) != 2:
            continue
        table = traced_tensor(node.inputs[0])  # shape and type only: the table is not read
        if table is None or len(table.shape) != 2 or table.dtype not in _NUMPY_FLOATS \
                or is_traced_const(node.inputs[1]):
            continue
        out.append(Embedding(node))
    return out



def _stream_start(embeddings: list[Embedding], graph: ir.Graph) -> Embedding | None:
    """The token embedding: a Gather whose indices come (through Casts) from a graph input, widest table."""
    inputs = set(graph.inputs)
    candidates = [e for e in embeddings if skip_casts_back(e.node.inputs[1]) in inputs]
    if not candidates:
        return None
    return max(candidates, key=lambda e: traced_tensor(e.table).shape[0])


def _position_table(add: ir.Node, index: int, width: int) -> tuple[ir.Node, int] | None:
    """(node, input index) holding the constant [positions, width] table that `add` adds at input `index`:
    the Add itself, or the Slice of the table's rows that the Add reads (a learned position embedding cut to
    the sequence length); None when that input is not such a table."""
    value = add.inputs[index]
    holder, slot = add, index
    producer = value.producer()
    if producer is not None and producer.op_type == "Slice" and len(producer.inputs) > 3:
        axes = traced_const(producer.inputs[3])
        if axes is None or any(int(a) not in (0, -2) for a in axes.reshape(-1)):
            return None
        holder, slot = producer, 0
    table = traced_const(holder.inputs[slot])
    if table is None or table.ndim != 2 or table.shape[-1] != width:
        return None
    return holder, slot


def find_residual_stream(graph: ir.Graph, linears: list[Linear], norms: list[Norm], embeddings: list[Embedding],
                         moes: list | None = None) -> ResidualStream | None:
    start = _stream_start(embeddings, graph)
    if start is None:
        return None
    width = int(traced_tensor(start.table).shape[1])
    by_output = {lin.output: lin for lin in linears}
    moe_by_output = {moe.output: moe for moe in moes or []}
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    emb_by_output = {e.output: e for e in embeddings}
    norm_of_input = {n.input: n for n in norms}
    norm_nodes = {node: n for n in norms for node in n.nodes}
    stream = ResidualStream(width, [start.output], [], [start], [], [], [], None, None, True)
    value = start.output
    position_add = None
    for _ in range(10_000):
        nxt = None
        aliases = cast_aliases(value)  # float→float Casts of a stream tensor are the same stream tensor
        stream.values.extend(aliases[1:])
        readers = [(u, i) for a in aliases for u, i in data_readers(a) if u not in (a.producer() for a in aliases[1:])]
        for user, index in readers:
            if value is start.output and user.op_type == "Add" and len(user.inputs) == 2:
                table = _position_table(user, 1 - index, width)
                if table is not None:
                    stream.position_tables.append(table)
                    nxt = position_add = user
                    continue
            if user in norm_nodes and norm_nodes[user].input in aliases:
                norm = norm_nodes[user]
                if norm not in stream.norms:
                    stream.norms.append(norm)
                continue
            if user.op_type == "Add" and len(user.inputs) == 2 and not is_traced_const(user.inputs[1 - index]):
                other = user.inputs[1 - index]
                if other in by_output:
                    stream.writers.append(by_output[other])
                elif other in moe_by_output:
                    stream.writers += [e.mlp.down for e in moe_by_output[other].experts]
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
            if nxt is not position_add:
                stream.adds.append(nxt)
            value = nxt.outputs[0]
            stream.values.append(value)
            continue
        # no residual Add: the stream may pass through a (post-)norm whose output carries on
        post = next((norm_of_input[a] for a in aliases if a in norm_of_input), None)
        if post is not None and any(u.op_type == "Add" for u, _ in data_readers(post.output)):
            stream.pre_norm = False
            stream.values.append(post.output)
            value = post.output
            continue
        break
    # readers of the norms' outputs; the final norm is the one after the last residual Add
    for norm in stream.norms:
        users = data_readers(norm.output)
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


def _feeds_output(value: ir.Value, depth: int = 4) -> bool:
    for _ in range(depth):
        if value.is_graph_output():
            return True
        user = sole_reader(value)
        if user is None or user.op_type not in ("Cast", "Reshape", "Identity", "Squeeze", "Transpose"):
            return False
        value = user.outputs[0]
    return value.is_graph_output()
