"""cfws: a re-parameterised convolution as a coarse and a fine convolution (coarse & fine weight split).

Kind: exact. Merging a RepVGG/MobileOne block's branches folds the 1×1 and identity branches into the
centre taps of its 3×3 kernel, so the merged weights span a wide range and one INT8 step (max|W|/127)
rounds the small outer taps coarsely. With W = W_c + W_f (passes/cnn/weight_split.py: W_c exactly on
W's grid at the granularity the quantize step will use, |W_f| ≤ half a step):

    Conv(x, W) + b = Conv(x, W_c) + b + Conv(x, W_f)

which holds in floating point up to the rounding of the sums. A Conv is split when it is 2-D with a
square odd kernel of at least 3, one group, a constant weight read by it alone, and its centre taps
dominate: max|centre| ≥ `min_centre_ratio` · max|outer taps|. Others are left alone, with the reason
in the summary. Run it before `quantize`; each half then gets its own weight Q/DQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from onnxq.ir.graph import Namer, add_initializer, const_array, replace_initializer, take_over_output
from onnxq.passes.cnn.weight_split import centre_ratio, split_weight
from onnxq.pipeline.options import option
from onnxq.pipeline.passes import GraphPass, Kind, PassContext


@dataclass(frozen=True)
class CoarseFineSplit(GraphPass):
    name: ClassVar[str] = "cfws"
    kind: ClassVar[Kind] = Kind.EXACT

    min_centre_ratio: float = option(2.0, low=1.0)  # centre taps this many times the outer ones: merged branches

    def apply(self, model: ir.Model, ctx: PassContext) -> dict:
        graph, namer = model.graph, Namer(model.graph)
        qmax = 2 ** (ctx.scheme.weight_bits - 1) - 1
        split, left_alone = [], {}
        for conv in [n for n in graph if n.op_type == "Conv"]:
            problem = self._problem(conv)
            if problem:
                left_alone[conv.name] = problem
                continue
            _split(graph, namer, conv, qmax, ctx.scheme.per_channel)
            split.append(conv.name)
        graph.sort()
        return {"split": split, "left_alone": left_alone}

    def _problem(self, conv: ir.Node) -> str | None:
        """Why `conv` is not a merged re-parameterised kernel this pass splits (None: it is)."""
        w = const_array(conv.inputs[1])
        if w is None or conv.inputs[1].producer() is not None:
            return "weight is not an initializer"
        if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] < 3 or w.shape[2] % 2 == 0:
            return f"kernel {list(w.shape[2:])} is not square, odd and at least 3"
        if conv.attributes.get_int("group", 1) != 1:
            return "grouped convolution"
        if len(conv.inputs[1].uses()) != 1:
            return "weight shared with another node"
        ratio = centre_ratio(w)
        if ratio < self.min_centre_ratio:
            return f"centre taps {ratio:.2f}x the outer ones (< {self.min_centre_ratio}): not a merged kernel"
        return None


def _split(graph: ir.Graph, namer: Namer, conv: ir.Node, qmax: int, per_channel: bool) -> None:
    """conv keeps its bias and takes W_c; a bias-free twin takes W_f; an Add of the two replaces conv's output."""
    weight = conv.inputs[1]
    coarse, fine = split_weight(const_array(weight), qmax, per_channel)
    replace_initializer(weight, coarse)
    fine_conv = ir.Node("", "Conv", [conv.inputs[0], add_initializer(graph, namer, f"{weight.name}_fine", fine)],
                        attributes=[ir.Attr(a.name, a.type, a.value) for a in conv.attributes.values()],
                        name=namer.fresh(f"{conv.name}_fine"))
    out = conv.outputs[0]
    total = ir.Node("", "Add", [out, fine_conv.outputs[0]], name=namer.fresh(f"{conv.name}_coarse_plus_fine"))
    take_over_output(out, total.outputs[0], keep=total, rename=False)
    name = out.name  # the sum takes the name: it holds the value the name stood for
    out.name = namer.fresh(f"{name}_coarse")
    total.outputs[0].name, total.outputs[0].dtype, total.outputs[0].shape = name, out.dtype, out.shape
    fine_conv.outputs[0].name = namer.fresh(f"{name}_fine")
    fine_conv.outputs[0].dtype, fine_conv.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(conv, [fine_conv, total])
