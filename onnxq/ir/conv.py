"""Per-output-channel edits of a Conv or ConvTranspose with constant weights: how many output channels
it has, its weight scaled channel by channel, and a constant that broadcasts as one value per channel.

A Conv's weight is [C_out, C_in/g, k...], so output channel o is row o. A ConvTranspose's weight is
[C_in, C_out/g, k...]: output channel o = gi·(C_out/g) + j of group gi lives in rows gi·(C_in/g) ...
of column j, so scaling it means reshaping to (g, C_in/g, C_out/g, k...).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.ir.graph import attr, const_array

CHANNEL_LAYERS = ("Conv", "ConvTranspose")


def output_channels(node: ir.Node, weight: np.ndarray) -> int:
    if node.op_type == "ConvTranspose":
        return int(weight.shape[1]) * int(attr(node, "group", 1))
    return int(weight.shape[0])


def scale_output_channels(node: ir.Node, weight: np.ndarray, c: np.ndarray) -> np.ndarray:
    """`weight` with output channel o multiplied by c[o]."""
    kernel = (1,) * (weight.ndim - 2)
    if node.op_type == "ConvTranspose":
        groups = int(attr(node, "group", 1))
        per_group = weight.shape[1]
        grouped = weight.reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        return (grouped * c.reshape(groups, 1, per_group, *kernel)).reshape(weight.shape)
    return weight * c.reshape(-1, 1, *kernel)


def per_channel(array: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`array` as one value per output channel, if it broadcasts against a layer output of `rank`
    (channel axis 1) that way; None otherwise."""
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float32)


STEM_MAX_CHANNELS = 4


def is_image_stem(node: ir.Node) -> bool:
    """A plain (ungrouped) 2-D Conv over at most STEM_MAX_CHANNELS input channels read straight from a
    graph input: the first layer of an image model, which `--target ort-cpu` leaves float."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    weight = const_array(node.inputs[1])
    return (node.inputs[0].is_graph_input() and weight is not None and weight.ndim == 4
            and attr(node, "group", 1) == 1 and weight.shape[1] <= STEM_MAX_CHANNELS)
