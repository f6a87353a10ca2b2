"""A block of an ONNX graph as a differentiable torch module.

`BlockModule(block, points)` runs the block's nodes in order on torch tensors (the op functions are in
torch_ops). The learned weights are the module's parameters (`weight(name)`); every other constant is a
fixed buffer. With `quantized` set, each weight passes through its quantizer (round-to-nearest at the
point's scale unless rounding.py swapped in a learned one) and each activation reader named by an
ActivationPoint reads DQ(Q(x)) instead of x, exactly where the Q/DQ plan would put them; QuantizeLinear
/ DequantizeLinear nodes already in the block run as fake quantization too. With `quantized` off the
module computes the float block. Inputs and outputs follow `block.inputs` and `block.outputs`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxq.ir.graph import const_array, opset_version
from onnxq.quant.qdq import INT4, INT8, UINT4, UINT8
from onnxq.quant.reconstruct.blocks import Block
from onnxq.quant.reconstruct.fake_quant import WeightQuantizer, along, expand_scale, fake_quant, round_ste
from onnxq.quant.reconstruct.points import QuantPoints
from onnxq.quant.reconstruct.torch_ops import run_op

_RANGES = {fmt.dtype: (fmt.qmin, fmt.qmax) for fmt in (INT8, UINT8, INT4, UINT4)}


def _key(name: str) -> str:
    """A tensor name as a module attribute key (ParameterDict keys cannot hold dots)."""
    return re.sub(r"\W", "_", name)


class BlockModule(nn.Module):
    def __init__(self, block: Block, points: QuantPoints | None = None, opset: int | None = None,
                 model: ir.Model | None = None):
        super().__init__()
        self.block = block
        self.points = points or QuantPoints()
        self.opset = opset if opset is not None else (opset_version(model) if model is not None else 21)
        self.quantized = True
        self._keys: dict[str, str] = {}
        self.weights = nn.ParameterDict()
        for value in block.weight_values:
            key = self._claim(value.name)
            self.weights[key] = nn.Parameter(torch.from_numpy(const_array(value).astype(np.float32)),
                                             requires_grad=False)
        self.quantizers = nn.ModuleDict({self._keys[name]: WeightQuantizer(point)
                                         for name, point in self.points.weights.items() if name in self._keys})
        self._constant_names: list[str] = []
        produced = {v.name for node in block.nodes for v in node.outputs}
        for node in block.nodes:
            for value in node.inputs:
                if value is None or value.name in self._keys or value.name in produced:
                    continue
                array = const_array(value)
                if array is not None:
                    self._claim(value.name)
                    self.register_buffer(self._keys[value.name], _tensor(array), persistent=False)
                    self._constant_names.append(value.name)
        for node in block.nodes:  # Constant nodes inside the block are buffers too
            if node.op_type == "Constant":
                for value in node.outputs:
                    self._claim(value.name)
                    self.register_buffer(self._keys[value.name], _tensor(const_array(value)), persistent=False)
                    self._constant_names.append(value.name)
        self._reader_points = self.points.reader_points()

    def _claim(self, name: str) -> str:
        if name not in self._keys:
            key, i = f"t_{_key(name)}", 1
            while key in self._keys.values():
                key, i = f"t_{_key(name)}_{i}", i + 1
            self._keys[name] = key
        return self._keys[name]

    # --- what rounding and fold-back use -------------------------------------------------------------

    def weight(self, name: str) -> nn.Parameter:
        return self.weights[self._keys[name]]

    def quantizer(self, name: str) -> WeightQuantizer:
        return self.quantizers[self._keys[name]]

    def set_quantizer(self, name: str, quantizer: WeightQuantizer) -> None:
        self.quantizers[self._keys[name]] = quantizer

    @property
    def quantized_weights(self) -> list[str]:
        """Names of the block's weights that have a weight point (and so a quantizer)."""
        return [name for name in self.points.weights if name in self._keys]

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {v.name: x for v, x in zip(self.block.inputs, inputs)}
        for name in self._constant_names:
            env[name] = getattr(self, self._keys[name])
        for key_name, key in self._keys.items():
            if key in self.weights:
                w = self.weights[key]
                env[key_name] = self.quantizers[key](w) if self.quantized and key in self.quantizers else w
        for node in self.block.nodes:
            if node.op_type == "Constant":
                continue
            args = [None if v is None else self._read(env, node, i, v) for i, v in enumerate(node.inputs)]
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                outs = [self._qdq_node(node, *args)]
            else:
                outs = run_op(node, args, self.opset)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out
        return [env[v.name] for v in self.block.outputs]

    def _read(self, env, node: ir.Node, index: int, value: ir.Value) -> torch.Tensor:
        x = env[value.name]
        found = self._reader_points.get((node.name, index)) if self.quantized else None
        if found is None:
            return x
        point = found[1]
        return fake_quant(x, point.scale, point.zero_point, point.fmt.qmin, point.fmt.qmax)

    def _qdq_node(self, node: ir.Node, x, scale, zero_point=None):
        """QuantizeLinear → integers as float (STE rounding); DequantizeLinear → (q − z)·s."""
        axis = node.attributes.get_int("axis", 1)
        block_size = node.attributes.get_int("block_size", 0)
        if scale.dim() == 1 and x.dim() > 1 and not block_size:
            scale = along(scale, x.dim(), axis % x.dim())
            zero_point = None if zero_point is None else along(zero_point, x.dim(), axis % x.dim())
        elif block_size:
            scale = expand_scale(scale, tuple(x.shape), 1 - axis % x.dim(), block_size)
            zero_point = None if zero_point is None else expand_scale(zero_point, tuple(x.shape),
                                                                      1 - axis % x.dim(), block_size)
        z = 0.0 if zero_point is None else zero_point.float()
        if node.op_type == "DequantizeLinear":
            return (x.float() - z) * scale
        if not self.quantized:  # float reference: the pair Q→DQ becomes the identity (up to float error)
            return x / scale + z
        qmin, qmax = _RANGES.get(node.outputs[0].dtype, (-128, 127))
        return torch.clamp(round_ste(x / scale) + z, qmin, qmax)


def _tensor(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float32))
    if array.dtype.kind not in "iub":  # 4-bit integers (ml_dtypes) have no torch dtype
        array = array.astype(np.int32)
    return torch.from_numpy(array.copy())
