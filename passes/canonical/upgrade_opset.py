"""upgrade_opset: convert the model to a newer ONNX opset (default 19).

Kind: exact (the version converter rewrites operators into their newer definitions with the same
results). Per-channel Q/DQ needs opset 13 or later, and INT4 weights opset 21; older models are
lifted first. A model already at or above the requested opset is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnxscript import version_converter

from onnxq.errors import OnnxqError
from onnxq.ir.graph import opset_version
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext


@dataclass(frozen=True)
class UpgradeOpset(GraphPass):
    name: ClassVar[str] = "upgrade_opset"
    kind: ClassVar[Kind] = Kind.EXACT

    opset: int = option(19, low=13)  # per-channel Q/DQ needs 13

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        before = opset_version(model)
        if before >= self.opset:
            return {"opset": before}
        # ONNX's converter (the fallback) rebuilds the nodes without their metadata: keep it by node name
        metadata = {n.name: dict(n.metadata_props) for n in model.graph if n.name and n.metadata_props}
        try:
            # onnxscript logs a warning whenever it falls back to ONNX's converter, which is routine
            logging.getLogger("onnxscript").setLevel(logging.ERROR)
            version_converter.convert_version(model, target_version=self.opset, fallback=True)
        except Exception as exc:  # the converters raise many types; the user needs the op it failed on
            raise OnnxqError(f"cannot convert the model from opset {before} to {self.opset}: "
                             f"{str(exc).splitlines()[0]}") from None
        if opset_version(model) < self.opset:
            raise OnnxqError(f"the opset converter left the model at opset {opset_version(model)}")
        for node in model.graph:
            for key, value in metadata.get(node.name, {}).items():
                node.metadata_props.setdefault(key, value)
        return {"opset_before": before, "opset": opset_version(model)}
