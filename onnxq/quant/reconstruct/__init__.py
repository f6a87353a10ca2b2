"""Learned post-training quantization by block reconstruction (AdaRound, FlexRound).

A block is cut out of an onnx_ir graph (`blocks`), turned into a differentiable torch module with fake
quantization wherever the Q/DQ plan puts a QuantizeLinear/DequantizeLinear (`torch_block`, `points`), its
weights' rounding (and FlexRound's steps) is learned against the block's float outputs on captured
inputs (`rounding`), and the learned integers and scales are written back as plain integer weights with a
DequantizeLinear (`fold_back`): the deployed graph has no op that onnxq did not already write.

Torch is imported only inside this package, and nothing in onnxq imports the package at import time.
"""
