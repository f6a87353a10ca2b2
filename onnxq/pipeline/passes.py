"""The pass contract: what every graph pass of onnxq is and may use.

A pass is an onnx_ir in-place pass (`onnx_ir.passes.InPlacePass`) written as a frozen dataclass
whose fields are its options, with a `name` (the recipe's word for it) and a declared `kind`:
- exact: floating-point outputs are unchanged (the pipeline verifies this on calibration data);
- approximate: outputs change within a bound the pass documents and its tests measure;
- needs-retraining: the pass swaps in weights that only retraining can produce.
`requires(model)` states what must hold before the pass runs (an order rule, an opset) and
`ensures(model)` what holds after it; either raises `PassConditionError` with the reason.
`apply(model, ctx)` rewrites the model in place and returns a short summary for the record.

A pass that changes the values of an intermediate tensor (rescaling, rotation) renames it (for
example `x` → `x_equalized`), so tools that match tensors by name never compare unlike values.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.metadata import CODEBOOK_KEY
from onnxq.quant.scheme import QuantScheme
from onnxq.stats.calib_data import CalibrationSet

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                     "ConvInteger", "MatMulInteger"})


class Kind(str, enum.Enum):
    EXACT = "exact"
    APPROXIMATE = "approximate"
    RETRAIN = "needs-retraining"


class PassConditionError(OnnxqError):
    """A pass's precondition or postcondition does not hold; the message says which and why."""


@dataclass
class PassContext:
    """What passes may use besides the model: calibration data, the quantization scheme, output."""

    calibration: CalibrationSet | None = None
    scheme: QuantScheme = QuantScheme()
    log: Callable[[str], None] = print
    show_progress: bool = True

    @property
    def target(self) -> str:
        return self.scheme.target

    def require_calibration(self, pass_name: str) -> CalibrationSet:
        if self.calibration is None:
            raise OnnxqError(f"pass '{pass_name}' needs calibration data (give --calib)")
        return self.calibration


class GraphPass(ir.passes.InPlacePass):
    """Base of every pass; subclasses are frozen dataclasses whose fields are the pass's options.

    Called as a plain onnx_ir pass (`FoldNorm()(model)`) it runs without calibration data on the
    default scheme; the pipeline calls `apply` with the run's context instead.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]

    def apply(self, model: ir.Model, ctx: PassContext) -> dict[str, Any]:
        """Rewrite `model` in place; return a short summary (counts) for the record."""
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        """Raise PassConditionError when the pass cannot run on `model` (order rules, opsets)."""

    def ensures(self, model: ir.Model) -> None:
        """Raise PassConditionError when the rewritten `model` breaks what the pass promises."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.apply(model, PassContext(show_progress=False, log=lambda _: None))
        return ir.passes.PassResult(model, modified=True)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def has_qdq(model: ir.Model) -> bool:
    """Whether quantize has run: Q/DQ nodes other than the codebook weights vq_weights writes before it."""
    return any(node.op_type in QDQ_OPS and CODEBOOK_KEY not in node.metadata_props for node in model.graph)


def before_quantize(graph_pass: GraphPass, model: ir.Model) -> None:
    """Order rule of the passes that prepare a float graph: they run before Q/DQ exists."""
    if has_qdq(model):
        raise PassConditionError(f"pass '{graph_pass.name}' rewrites the float graph: put it before 'quantize' "
                                 "in the recipe")


def after_quantize(graph_pass: GraphPass, model: ir.Model) -> None:
    """Order rule of the passes that read or extend the quantized graph."""
    if not has_qdq(model):
        raise PassConditionError(f"pass '{graph_pass.name}' works on the quantized graph: put it after 'quantize' "
                                 "in the recipe")
