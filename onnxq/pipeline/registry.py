"""The one table of graph passes: recipe name → the module and class that implement it.

Modules are imported only when a recipe names their pass, so plain quantization never imports the
passes (or the libraries) it does not run. A new pass is one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from onnxq.pipeline import GraphPass

_PASSES = "onnxq.passes"
PASS_TABLE: dict[str, str] = {
    # canonicalisation
    "lift_constants": "canonical.lift_constants:LiftConstants",
    "fold_constants": "canonical.fold_constants:FoldConstants",
    "upgrade_opset": "canonical.upgrade_opset:UpgradeOpset",
    "fold_batchnorm": "canonical.fold_batchnorm:FoldBatchNorm",
    # CNNs
    "equalize": "cnn.equalize:Equalize",
    "recentre": "cnn.recentre:Recentre",
    "cfws": "cnn.cfws:CoarseFineSplit",
    # transformers
    "fold_norm": "transformer.fold_norm:FoldNorm",
    "rotate": "transformer.rotate:Rotate",
    "klt_rotate": "transformer.klt_rotate:KltRotate",
    "smooth": "transformer.smooth:Smooth",
    "split_range": "transformer.split_range:SplitRange",
    # recurrent LMs
    "smooth_fused_rotate": "mamba.smooth_fused_rotate:SmoothFusedRotate",
    "scan_precision": "mamba.scan_precision:ScanPrecision",
    "vq_weights": "rwkv.vq_weights:VectorQuantizeWeights",
    # PETR
    "petr_pe": "petr.tag_pe:PetrPE",
    "pe_fold": "petr.pe_fold:PeFold",
    "fold_position_bias": "petr.fold_position_bias:FoldPositionBias",
    "qfpe": "petr.qfpe:Qfpe",
    # quantization and fully quantized nonlinear ops
    "allocate_bits": "quant.allocate_bits:AllocateBits",
    "quantize": "quant.quantize:Quantize",
    "half_float": "quant.half_float:HalfFloat",
    "dulut": "nonlinear.dulut:Dulut",
    "qans": "nonlinear.qans:Qans",
    "integer_ops": "nonlinear.integer_ops:IntegerOps",
}


def pass_names() -> list[str]:
    return sorted(PASS_TABLE)


def pass_class(name: str) -> type[GraphPass]:
    """The class of pass `name`, importing its module on first use."""
    if name not in PASS_TABLE:
        raise OnnxqError(f"unknown pass '{name}' (known passes: {', '.join(pass_names())})")
    module, cls = PASS_TABLE[name].split(":")
    return getattr(importlib.import_module(f"{_PASSES}.{module}"), cls)
