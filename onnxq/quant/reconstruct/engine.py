"""Learned rounding for a whole model, block after block, as the quantize pass calls it.

The model arrives with its activation Q/DQ already in place and its weights still float. Blocks are cut
in graph order (one per encoder/decoder layer when a residual stream is found, else residual CNN blocks),
and for each: its inputs are captured by running the model as it stands, so every earlier block is
already quantized with its learned weights; the block becomes a torch module whose graph Q/DQ nodes run
as fake quantization and whose weights are quantized at the scheme's scales; rounding (AdaRound or
FlexRound) is fitted against the float block's outputs on those inputs; and the learned integers and
scales are handed to `write`, which stores them as quantize stores any weight. A weight read outside
its block, or by an op the converter does not run, is left to round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.analysis.structure import analyse
from onnxq.errors import OnnxqError
from onnxq.progress import progress
from onnxq.quant.reconstruct.blocks import Block, cnn_blocks, transformer_blocks
from onnxq.quant.reconstruct.fold_back import learned_weights
from onnxq.quant.reconstruct.points import QuantPoints, WeightPoint
from onnxq.quant.reconstruct.rounding import LearnConfig, NothingToLearn, learn_rounding
from onnxq.quant.reconstruct.torch_block import BlockModule
from onnxq.quant.reconstruct.torch_ops import UnsupportedOp
from onnxq.runtime.session import exposing, session

Feed = Mapping[str, np.ndarray]
Write = Callable[[str, np.ndarray, np.ndarray], None]  # weight name, integers, scale


def model_blocks(model: ir.Model) -> list[Block]:
    """Decoder/encoder layers where onnxq.analysis finds a transformer, residual CNN blocks otherwise."""
    structure = analyse(model)
    return transformer_blocks(model, structure=structure) if structure.attentions else cnn_blocks(model.graph)


def learn_model_rounding(model: ir.Model, weights: Mapping[str, WeightPoint], data: Iterable[Feed],
                         config: LearnConfig, write: Write, *, show_progress: bool = True,
                         log: Callable[[str], None] = lambda _: None) -> dict:
    """Learn the rounding of `weights` (name → its round-to-nearest point) block by block; returns a
    summary (blocks learned, weights written, mean squared block error before and after)."""
    blocks = [(block, names) for block in model_blocks(model) if (names := _learnable(block, weights))]
    written: set[str] = set()
    before = after = 0.0
    kept = learned = 0
    for block, names in progress(blocks, desc=f"quantize: {config.method}", unit="block", disable=not show_progress):
        points = QuantPoints({}, {name: weights[name] for name in names})
        try:
            module = BlockModule(block, points, model=model)
            inputs, shared, batch = capture(model, block, data)
            fixed = batch if _holds_batch_size(inputs, shared, batch) else None
            if fixed is not None and fixed < config.batch_size:
                log(f"quantize: {config.method}: block {block.nodes[0].name!r} reads a shape value computed for "
                    f"batches of {fixed}: it runs {fixed} samples at a time")
            report = learn_rounding(module, inputs, config=config, shared=shared, fixed_batch=fixed)
        except (UnsupportedOp, NothingToLearn) as exc:
            log(f"quantize: {config.method}: block {block.nodes[0].name!r} left to round-to-nearest ({exc})")
            continue
        log(f"quantize: {config.method} block '{block.nodes[0].name}'..'{block.nodes[-1].name}': output error "
            f"{report.mse_nearest:.3e} -> {report.mse_learned:.3e}"
            f"{' (worse: kept round-to-nearest)' if report.kept_nearest else ''} in {report.seconds:.1f} s")
        before, after, kept = before + report.mse_nearest, after + min(report.mse_learned, report.mse_nearest), \
            kept + report.kept_nearest
        learned += 1
        for name, (q, scale) in learned_weights(module).items():
            write(name, q, scale)
            written.add(name)
    # blocks with an unsupported op are not counted: they stayed round-to-nearest
    return {"learned_blocks": learned, "learned_weights": len(written), "blocks_kept_nearest": kept,
            "block_mse_nearest": float(f"{before:.4e}"), "block_mse_learned": float(f"{after:.4e}")}


def _holds_batch_size(inputs: list[np.ndarray], shared: list[bool], batch: int) -> bool:
    """Whether a shared integer input (a shape value computed outside the block) holds the captured batch
    size: a Reshape reading it is then right for batches of that size only."""
    return any(whole and np.issubdtype(x.dtype, np.integer) and x.ndim <= 1 and batch in x.reshape(-1).tolist()
               for x, whole in zip(inputs, shared))


def _learnable(block: Block, weights: Mapping[str, WeightPoint]) -> list[str]:
    """The block's weights in `weights` whose every reader is a node of the block."""
    inside = set(block.nodes)
    return [v.name for v in block.weight_values
            if v.name in weights and all(user in inside for user in v.consumers())]


def capture(model: ir.Model, block: Block, data: Iterable[Feed]) -> tuple[list[np.ndarray], list[bool], int]:
    """The block's inputs on every calibration batch, joined along the sample axis; which of them every
    sample shares (a causal mask or a position table whose first axis is not the batch's, a shape value);
    and the size of the first batch, for which shared shape values were computed."""
    names = [v.name for v in block.inputs]
    internal = [n for n in names if not any(n == i.name for i in model.graph.inputs)]
    sess = session(exposing(model, internal))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    shared = dict.fromkeys(names, False)
    for feed in data:
        batch = next(iter(feed.values())).shape[0]
        values = dict(zip(internal, sess.run(internal, dict(feed)))) if internal else {}
        values.update({n: np.asarray(feed[n]) for n in names if n in feed})
        for n in names:
            if n not in values:
                raise OnnxqError(f"block input '{n}' is neither a graph input nor computed by the model")
            shared[n] = shared[n] or values[n].ndim == 0 or values[n].shape[0] != batch
            parts[n].append(values[n])
    if not parts[names[0]]:
        raise OnnxqError("learned rounding needs calibration data")
    # no per-sample input at all: learn_rounding has nothing to learn from, whatever the batch
    first_batch = next((parts[n][0].shape[0] for n in names if not shared[n]), 1)
    return ([parts[n][0] if shared[n] else np.concatenate(parts[n]) for n in names], [shared[n] for n in names],
            first_batch)
