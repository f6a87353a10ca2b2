"""Deployment targets: which rule table places the Q/DQ nodes, and which integer formats they use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.quant import ort_cpu
from onnxq.quant.bias_range import widen_weight_scales
from onnxq.quant.qdq import INT8, UINT8, IntFormat, Plan
from onnxq.quant.qdq_rules import ORT_CPU_TABLE, TENSORRT_TABLE, Treatment


@dataclass(frozen=True)
class Target:
    name: str
    table: dict[str, Treatment]
    activation_format: IntFormat
    symmetric: bool
    description: str
    # rewrites run just before Q/DQ placement so the target's runtime fuses what is placed
    # (called with the model and whether the activations are signed)
    prepare: Callable[[ir.Model, bool], dict[str, int]] | None = None
    # how a bias past int32 (as the runtime re-quantizes it) is made to fit, where the target's runtime
    # would otherwise leave the layer in float; what it leaves goes to an Add after the layer
    fit_biases: Callable[[ir.Graph], list[str]] | None = None
    # drops planned Q/DQ pairs the target's runtime would gain nothing from; returns how many
    settle_plan: Callable[[Plan], int] | None = None


TARGETS = {
    "tensorrt": Target("tensorrt", TENSORRT_TABLE, INT8, True,
                       "TensorRT explicit quantization: symmetric INT8, zero point 0, Q/DQ on weighted-layer inputs"),
    "ort-cpu": Target("ort-cpu", ORT_CPU_TABLE, UINT8, False,
                      "ONNX Runtime CPU: asymmetric UINT8 (or INT8) activations and INT8 weights, Q/DQ around every op "
                      "with an integer kernel so ORT fuses them into QLinear* kernels",
                      prepare=ort_cpu.prepare, fit_biases=widen_weight_scales, settle_plan=ort_cpu.drop_idle_qdq),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise OnnxqError(f"unknown target '{name}' (choose from {', '.join(TARGETS)})")
    return TARGETS[name]
