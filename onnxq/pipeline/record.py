"""The record of what ran, kept in the model's metadata_props (Netron shows it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir

from onnxq import __version__, metadata


@dataclass
class PassRecord:
    name: str
    kind: str
    options: dict[str, Any]
    summary: dict[str, Any]
    seconds: float
    max_rel_change: float | None = None  # measured for exact passes


def write_record(model: ir.Model, records: list[PassRecord], recipe_name: str, target: str) -> None:
    """Store what ran in metadata_props: one JSON record plus one readable line per pass (Netron)."""
    props = model.metadata_props
    previous = read_record(model)
    start = len(previous)
    props[metadata.VERSION_KEY] = __version__
    props[metadata.RECIPE_KEY] = recipe_name
    props[metadata.TARGET_KEY] = target
    props[metadata.PASSES_KEY] = json.dumps(previous + [dataclasses.asdict(r) for r in records])
    for i, r in enumerate(records, start=start + 1):
        options = ", ".join(f"{k}={v}" for k, v in r.options.items())
        summary = ", ".join(f"{k}={v}" for k, v in r.summary.items() if not isinstance(v, (dict, list)))
        props[f"{metadata.PASS_LINE_PREFIX}{i:02d}.{r.name}"] = f"[{r.kind}] {options}" + (f" | {summary}" if summary else "")


def read_record(model: ir.Model) -> list[dict[str, Any]]:
    """The passes recorded in `model` ([] when none, or when the record is not onnxq's JSON list)."""
    try:
        record = json.loads(model.metadata_props.get(metadata.PASSES_KEY, "[]"))
    except json.JSONDecodeError:
        return []
    return record if isinstance(record, list) and all(isinstance(r, dict) for r in record) else []


def ir_version_for(model: ir.Model) -> int:
    """The IR version the output needs: 10 (node metadata, INT4) or what its opsets require.

    Writers like onnx.helper stamp the newest IR version, which runtimes often cannot read yet.
    """
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return max(10, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
