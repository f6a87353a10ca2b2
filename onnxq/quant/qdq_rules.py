"""Which op gets which QDQ treatment, per target: one table each, no if-chains.

A treatment looks at one node and tells the planner (`onnxq.quant.qdq.Planner`) which of the node's
tensors to quantize, or why the node stays in float. The TensorRT table follows the rules in
docs/tensorrt-rules.md: quantize every input of weighted layers (activations per tensor,
weights per output channel), quantize the residual input of an Add that TensorRT fuses into the
preceding weighted layer, put no Q/DQ on data-movement ops (TensorRT moves Q/DQ across them),
share one scale across Concat inputs, and store embedding tables (constants read by Gather) INT8 per row
when the quantize step asks for it. The ONNX Runtime CPU table quantizes inputs *and* outputs of
every op that has an int8 kernel, because ORT only fuses DQ→op→Q into an integer kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxq.ir.conv import is_image_stem
from onnxq.ir.graph import attr, const_tensor, is_const
from onnxq.metadata import RANGE_MARGIN_KEY

if TYPE_CHECKING:
    from onnxq.quant.qdq import Planner


class Treatment:
    def plan(self, node: ir.Node, p: Planner) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Weighted(Treatment):
    """Conv/ConvTranspose/Gemm/MatMul: activations per tensor, constant weights per channel.

    `quantize_output` is for ONNX Runtime, whose integer kernels need a Q after the op too.
    """

    quantize_output: bool = False

    def plan(self, node, p):
        for index in range(min(len(node.inputs), 2)):
            value = node.inputs[index]
            if value is None:
                continue
            if is_const(value):
                p.weight(node, index, weight_axis(node, index))
            else:
                p.activation(node, index)
        if self.quantize_output:
            p.output(node)


def weight_axis(node: ir.Node, index: int) -> int | None:
    """The output-channel axis of a weight input (TensorRT takes per-axis scales there only), None for
    per-tensor only."""
    value = node.inputs[index]
    rank = len(value.shape) if value.shape is not None else 0
    if node.op_type == "Conv":
        return 0 if index == 1 else None
    if node.op_type == "ConvTranspose":
        return 1 if index == 1 else None
    if node.op_type == "Gemm":
        if index == 1:
            return 0 if attr(node, "transB", 0) else 1
        return None
    if node.op_type == "MatMul":
        return rank - 1 if index == 1 and rank >= 2 else None
    return None


@dataclass(frozen=True)
class ResidualAdd(Treatment):
    """Add fused into the weighted layer that produces one input: quantize the *other* (residual) input."""

    def plan(self, node, p):
        inputs = [v for v in node.inputs if v is not None]
        fused = [v for v in inputs if p.is_weighted_output(v)]
        if len(inputs) == 2 and len(fused) >= 1 and all(not is_const(v) for v in inputs):
            other = 1 if inputs[0] is fused[0] else 0
            p.activation(node, other)
        else:
            p.keep_float(node, "element-wise Add not fused into a weighted layer: TensorRT runs it in float")


@dataclass(frozen=True)
class SharedScale(Treatment):
    """Concat: no Q/DQ of its own, but every quantized input and the output share one scale."""

    def plan(self, node, p):
        p.share_scale([*node.inputs, node.outputs[0]])
        p.keep_float(node, "data movement; its quantized inputs and output share one scale (Concat rule)")


@dataclass(frozen=True)
class Passthrough(Treatment):
    """Ops that only move data: TensorRT propagates Q/DQ across them, so none is needed here."""

    def plan(self, node, p):
        p.keep_float(node, "moves data only: runs in the precision of its input (TensorRT moves Q/DQ across it)")


@dataclass(frozen=True)
class EmbeddingTable(Treatment):
    """Gather from a constant float table (an embedding): the table is stored INT8 with one symmetric
    scale per row (DequantizeLinear, axis 0, before the Gather) when the quantize step asks for it
    (`embeddings: int8`); any other Gather gets the `otherwise` treatment.

    A table qualifies when it is a 2-D float constant read only as the data of axis-0 Gathers: each
    gathered row then carries its own scale, and no other reader needs the float copy."""

    otherwise: Treatment
    quantize_output: bool = False  # ONNX Runtime: a Q after the Gather too, as for its other Gathers

    def plan(self, node, p):
        if not is_embedding_table(node.inputs[0]):
            self.otherwise.plan(node, p)
            return
        if p.quantize_tables:
            p.embedding_table(node)
        else:
            p.keep_float(node, "embedding table kept in float (quantize option embeddings: float)")
        if self.quantize_output:
            p.output(node)


def is_embedding_table(value: ir.Value | None) -> bool:
    """A 2-D float constant whose every reader is an axis-0 Gather reading it as data."""
    if value is None or value.dtype not in _FLOAT_TABLE_TYPES or not is_const(value):
        return False
    shape = value.shape if value.shape is not None else const_tensor(value).shape
    return len(shape) == 2 and all(user.op_type == "Gather" and index == 0 and attr(user, "axis", 0) == 0
                                   for user, index in value.uses())


_FLOAT_TABLE_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class FusedActivation(Treatment):
    """ReLU-like activations that TensorRT fuses into the weighted layer before them."""

    def plan(self, node, p):
        if p.is_weighted_output(node.inputs[0]):
            p.keep_float(node, "fused into the preceding weighted layer by TensorRT")
        else:
            p.keep_float(node, "activation on a float tensor: not fused, runs in float")


@dataclass(frozen=True)
class Float(Treatment):
    reason: str

    def plan(self, node, p):
        p.keep_float(node, self.reason)


@dataclass(frozen=True)
class Int8Op(Treatment):
    """ONNX Runtime CPU: an op with an integer kernel; all float inputs and its output quantized."""

    share_in_out: bool = False  # data-movement ops need equal input/output scales to be dropped

    def plan(self, node, p):
        for index, value in enumerate(node.inputs):
            if value is not None and p.is_float_data(value) and not is_index_input(node, index):
                p.activation(node, index)
        p.output(node)
        if self.share_in_out:
            p.share_scale([node.inputs[0], node.outputs[0]])


@dataclass(frozen=True)
class Int8FusedActivation(Treatment):
    """ONNX Runtime CPU: ReLU/Clip right after a layer whose output ORT quantizes (weighted layer or
    an op with an integer kernel, e.g. the Add of hard-swish's x + 3).

    The layer's output is quantized with the activation's output range (zero point at 0 for ReLU),
    so the unsigned clamp itself applies the activation: ORT drops the ReLU/Clip and the repeated
    Q/DQ, leaving one integer kernel (QLinearConv, QGemm, QLinearAdd)."""

    def plan(self, node, p):
        source = node.inputs[0]
        producer = source.producer() if source is not None else None
        quantized_output = producer is not None and (
            (p.is_weighted_output(source) and producer.op_type in WEIGHTED)
            or (producer.op_type in _ORT_INT8_KERNELS and p.table.get(producer.op_type) == Int8Op()))
        if quantized_output and len(source.uses()) == 1 and not source.is_graph_output():
            p.use_range_of(source, node.outputs[0])
            p.output(node)
        else:
            Int8Op(share_in_out=True).plan(node, p)


@dataclass(frozen=True)
class StemConv(Treatment):
    """ONNX Runtime CPU: an image stem (`onnxq.ir.conv.is_image_stem`: a Conv over at most 4 channels
    read straight from the model input) stays float, its output quantized by the next layers' rules;
    any other Conv is `otherwise`. ORT's integer Conv multiplies im2col rows of k·k·C_in, short for 3
    channels, and the float input would first need a quantize and a layout transpose: measured on
    MobileNetV2 (VNNI CPU, one thread) the float stem saved 5 % of the model's latency.

    Not when a MaxPool reads the stem (through a ReLU, as in ResNet): after a float stem ORT moves the
    MaxPool's output Q above it and runs its 8-bit NCHW MaxPool loop (measured: 7 ms against 0.16 ms
    in float), while after an integer stem it makes it an NHWC integer MaxPool."""

    otherwise: Treatment

    def plan(self, node, p):
        if is_image_stem(node) and not _feeds_maxpool(node.outputs[0]):
            p.keep_float(node, "image stem (a few channels from the model input): ORT's float Conv is faster "
                               "here than quantizing the input for its integer one")
        else:
            self.otherwise.plan(node, p)


def _feeds_maxpool(value: ir.Value) -> bool:
    for user, _ in value.uses():
        if user.op_type == "MaxPool" or (user.op_type in ("Relu", "Clip") and _feeds_maxpool(user.outputs[0])):
            return True
    return False


@dataclass(frozen=True)
class MaxPoolAfterConv(Treatment):
    """ONNX Runtime CPU: MaxPool on the integers only right after a quantized Conv (through a ReLU/Clip),
    where ORT's layout pass makes it an NHWC integer MaxPool; elsewhere (after an Add, a Mul, a float
    layer) ORT's 8-bit MaxPool is a plain NCHW loop (0.17 ms on the PP-OCR direction classifier,
    where the float one takes 0.015 ms), so it stays float between the Q/DQ of its neighbours. ORT
    would still drop that DQ/Q pair, and run the 8-bit loop, when both carry one scale (max commutes
    with the quantizer, so calibration gives equal ranges): the output's range is widened by
    `OUTPUT_MARGIN` (`onnxq.range_margin`) to keep them apart."""

    OUTPUT_MARGIN = 1.001

    def plan(self, node, p):
        source = node.inputs[0].producer() if node.inputs[0] is not None else None
        while source is not None and source.op_type in ("Relu", "Clip"):
            source = source.inputs[0].producer()
        if source is not None and source.op_type == "Conv":  # a stem before a MaxPool is quantized (StemConv)
            Int8Op(share_in_out=True).plan(node, p)
        else:  # its input keeps a DQ even after a float op: without one, ORT moves the output Q above it
            p.activation(node, 0)
            node.metadata_props[RANGE_MARGIN_KEY] = f"{self.OUTPUT_MARGIN:g}"
            p.keep_float(node, "MaxPool not right after a quantized Conv: ORT's 8-bit MaxPool there is slower "
                               "than float")


@dataclass(frozen=True)
class AlreadyQuantized(Treatment):
    """Q/DQ written by an earlier onnxq pass (e.g. qans) is left as it is."""

    def plan(self, node, p):
        pass


@dataclass(frozen=True)
class IntegerOperator(Treatment):
    """QOperator-format ops: onnxq works from floating-point models only."""

    def plan(self, node, p):
        p.reject(f"the model already contains {node.op_type} nodes: give onnxq the floating-point model")


def is_index_input(node: ir.Node, index: int) -> bool:
    # inputs that carry shapes, indices or axes rather than data
    return index > 0 and node.op_type in {"Reshape", "Gather", "Slice", "Split", "Squeeze", "Unsqueeze",
                                          "Resize", "Pad", "Expand", "Tile", "Clip"}


# --- op categories --------------------------------------------------------------------------------

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Split", "Gather",
                 "GatherElements", "GatherND", "Identity", "Dropout", "Pad", "Resize", "Upsample", "Expand", "Tile",
                 "DepthToSpace", "SpaceToDepth", "ReverseSequence", "ScatterND", "ScatterElements", "Scatter",
                 "Compress", "CenterCropPad", "Col2Im", "GlobalMaxPool", "MaxUnpool", "MaxRoiPool", "Trilu")
RELU_LIKE = ("Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu")
NONLINEAR = ("Softmax", "LogSoftmax", "Hardmax", "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Swish",
             "Mish", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Shrink", "Exp", "Log", "Sqrt", "Reciprocal",
             "Pow", "Sin", "Cos", "Tan", "Sinh", "Cosh", "Asin", "Acos", "Atan", "Asinh", "Acosh", "Atanh",
             "SwiGLU")
NORMALISATION = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
                 "RMSNormalization", "LpNormalization", "MeanVarianceNormalization", "LRN")
ELEMENTWISE = ("Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Neg", "Abs", "Floor", "Ceil", "Round", "Sign",
               "Mod", "Where", "CumSum", "CumProd", "Einsum", "RotaryEmbedding")
REDUCTION = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
             "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "GlobalAveragePool", "AveragePool",
             "GlobalLpPool", "LpPool", "ArgMax", "ArgMin", "TopK")
NON_NUMERIC = ("Shape", "Size", "Constant", "ConstantOfShape", "Range", "Equal", "Less", "LessOrEqual", "Greater",
               "GreaterOrEqual", "Not", "And", "Or", "Xor", "Cast", "CastLike", "NonZero", "OneHot", "EyeLike",
               "IsNaN", "IsInf", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "BitCast",
               "Unique", "NonMaxSuppression", "RandomNormal", "RandomNormalLike", "RandomUniform",
               "RandomUniformLike", "Bernoulli", "Multinomial")
CONTROL_AND_SEQUENCE = ("If", "Loop", "Scan", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
                        "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
                        "Optional", "OptionalGetElement", "OptionalHasElement")
OTHER_COMPUTE = ("RoiAlign", "GridSample", "AffineGrid", "DeformConv", "LSTM", "GRU", "RNN", "Attention", "DFT",
                 "STFT", "Det", "LinearAttention", "CausalConvWithState", "TensorScatter")
QDQ = ("QuantizeLinear", "DequantizeLinear")
QOPERATOR = ("DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")

_REASONS = {
    NONLINEAR: "nonlinear function: kept in float (recipe full-int8 replaces it with a lookup table)",
    NORMALISATION: "normalisation: kept in float for accuracy",
    ELEMENTWISE: "element-wise arithmetic outside a weighted layer: TensorRT runs it in float",
    REDUCTION: "reduction/pooling: output stays float; the next weighted layer quantizes its input",
    NON_NUMERIC: "shape, index or boolean computation: not numeric activation data",
    CONTROL_AND_SEQUENCE: "control flow or sequences: subgraphs are not quantized",
    OTHER_COMPUTE: "no int8 rule for this layer type in onnxq yet: kept in float",
}


def _table(entries: dict) -> dict[str, Treatment]:
    """Flatten {ops: treatment} into {op: treatment}; later entries override earlier ones."""
    table: dict[str, Treatment] = {}
    for ops, treatment in entries.items():
        for op in ops:
            table[op] = treatment
    return table


_FLOAT = {ops: Float(reason) for ops, reason in _REASONS.items()}


TENSORRT_TABLE = _table({
    **_FLOAT,
    WEIGHTED: Weighted(),
    ("Add",): ResidualAdd(),
    ("Concat",): SharedScale(),
    DATA_MOVEMENT: Passthrough(),
    ("Gather",): EmbeddingTable(otherwise=Passthrough()),
    RELU_LIKE: FusedActivation(),
    QDQ: AlreadyQuantized(),
    QOPERATOR: IntegerOperator(),
})

# ONNX Runtime's CPU provider has integer kernels (QLinear*, or DQ/Q removal) for these.
_ORT_INT8 = ("Add", "Mul", "Sigmoid", "LeakyRelu", "GlobalAveragePool", "AveragePool", "Softmax", "Where")
_ORT_INT8_KERNELS = _ORT_INT8 + ("Concat",)
ORT_INTEGER_KERNELS = frozenset(_ORT_INT8_KERNELS + ("Conv", "Gemm", "MatMul"))  # what ORT computes on integers
_ORT_INT8_MOVES = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Gather", "Slice",
                   "Split", "Pad")
ORT_INTEGER_PASSTHROUGH = frozenset(_ORT_INT8_MOVES + ("Relu", "Clip"))  # run on the integers, or are dropped
ORT_CPU_TABLE = _table({
    **_FLOAT,
    DATA_MOVEMENT: Passthrough(),
    RELU_LIKE: FusedActivation(),
    WEIGHTED: Weighted(quantize_output=True),
    ("Conv",): StemConv(otherwise=Weighted(quantize_output=True)),
    _ORT_INT8: Int8Op(),
    _ORT_INT8_MOVES: Int8Op(share_in_out=True),
    ("MaxPool",): MaxPoolAfterConv(),
    ("Relu", "Clip"): Int8FusedActivation(),
    ("Concat",): Int8Op(),
    ("Gather",): EmbeddingTable(otherwise=Int8Op(share_in_out=True), quantize_output=True),
    ("ConvTranspose",): Float("ORT's CPU provider has no integer ConvTranspose: kept in float"),
    QDQ: AlreadyQuantized(),
    QOPERATOR: IntegerOperator(),
})
