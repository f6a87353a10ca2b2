"""Choosing nodes by name: exact names or regular expressions, and a clear error for a typo."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.metadata import SOURCE_NAME_KEY


def select_nodes(graph: ir.Graph, patterns: Iterable[str], what: str, *,
                 on_missing: Callable[[str], None] | None = None) -> list[str]:
    """Names of the nodes of `graph` that `patterns` name: each pattern is a node name or a regular
    expression matched against whole names, the node's present name or the name it had in the input
    model (the pipeline renames generic exporter names such as dynamo's `node_matmul_3`, and users name
    nodes as they see them in their model). A pattern that selects nothing is an error (a misspelled
    name would otherwise be ignored silently), or, given `on_missing`, is handed the message and
    skipped; `what` says where the patterns came from."""
    aliases = [(alias, node.name) for node in graph if node.name
               for alias in dict.fromkeys([node.name, node.metadata_props.get(SOURCE_NAME_KEY)]) if alias]
    names = [node.name for node in graph if node.name]
    current_of = dict(aliases)
    chosen: list[str] = []
    for pattern in patterns:
        if pattern in current_of:
            chosen.append(current_of[pattern])
            continue
        try:
            regex = re.compile(pattern)
        except re.error:
            regex = None
        hits = [current for alias, current in aliases if regex.fullmatch(alias)] if regex is not None else []
        if not hits:
            near = difflib.get_close_matches(pattern, names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            message = f"{what}: no node is named or matches '{pattern}'{hint}"
            if on_missing is None:
                raise OnnxqError(message)
            on_missing(message)
            continue
        chosen += hits
    return sorted(set(chosen))


def outside_op_types(graph: ir.Graph, op_types: Iterable[str]) -> list[str]:
    """Names of the nodes whose op type is not in `op_types` (an empty list restricts nothing): what
    quantizing only those op types leaves in float, like ONNX Runtime's op_types_to_quantize."""
    wanted = set(op_types)
    return [node.name for node in graph if wanted and node.name and node.op_type not in wanted]
