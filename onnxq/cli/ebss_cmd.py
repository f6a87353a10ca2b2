"""`onnxq ebss MODEL -o calib.npz --sequences N --length L`: an expert-balanced calibration set for a
mixture-of-experts LM, sampled from the model itself, with a table of how many tokens each expert got
(and, with --compare-with, the same for another calibration set)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.stats.ebss import BALANCE_WEIGHT, EBSSResult, build_ebss, collapsed_std, expert_coverage, share_std

EBSS_DESCRIPTION = f"""\
Build a calibration set for a mixture-of-experts language model by letting the model write it.
EBSS (expert-balanced self-sampling, after MoEQuant) runs a beam search over the model's own
next-token probabilities whose score also rewards beams that spread their tokens evenly over the
experts, so rarely routed experts get enough calibration tokens while the text stays the model's own.

The model: one int64 input [batch, sequence] and logits [batch, sequence, vocab] as first output,
with MoE layers onnxq recognises (router → TopK, experts weighted by per-token gates). The output
.npz holds one array [sequences, length] keyed by the input name: give it to quantize as --calib.

the score (per beam, at each step of the search):
  log-probability of the text (at --temperature) − balance weight × tokens × imbalance
  imbalance: the standard deviation of the experts' shares of the beam's tokens, averaged over the
  MoE layers, 0 when even and 1 when every token goes to the same experts; so --balance-weight is
  the cost, in nats per token, of a fully collapsed routing (default {BALANCE_WEIGHT:g}; 0: plain beam search).

cost: one ONNX Runtime run per generated token over all sequences × width beams at once, without a
KV cache, so time grows with sequences × width × length²; 64 × 128 tokens of a 4-layer byte model
take about 1.5 minutes on two CPU cores.

examples:
  onnxq ebss moe.onnx -o ebss.npz --sequences 64 --length 128
  onnxq ebss moe.onnx -o ebss.npz --sequences 16 --length 128 --compare-with text.npz   coverage side by side
  onnxq quantize moe.onnx --calib ebss.npz -o moe.int8.onnx"""


def positive_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise ValueError
    return value


positive_float.__name__ = "positive number"  # argparse names the type in its message


def non_negative_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise ValueError
    return value


non_negative_float.__name__ = "number >= 0"


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


non_negative_int.__name__ = "integer >= 0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `onnxq ebss`."""
    from onnxq.cli.parser import _positive  # the parser's own type, so messages read alike

    parser.add_argument("model", help="FP32 .onnx mixture-of-experts language model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.npz",
                        help="the calibration .npz to write (keyed by the model's input name)")
    parser.add_argument("--sequences", type=_positive, required=True, metavar="N", help="how many sequences (e.g. --sequences 64)")
    parser.add_argument("--length", type=_positive, required=True, metavar="L", help="tokens per sequence (e.g. --length 128)")
    parser.add_argument("--width", type=_positive, default=4, metavar="W", help="beams per sequence (default 4)")
    parser.add_argument("--temperature", type=positive_float, default=1.2, metavar="T",
                        help="softmax temperature of the next-token probabilities (default 1.2)")
    parser.add_argument("--balance-weight", type=non_negative_float, default=BALANCE_WEIGHT, metavar="X",
                        help=f"nats per token a fully collapsed routing costs (default {BALANCE_WEIGHT:g}; "
                             "0 turns balancing off)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                        help="seed of the first tokens; the same seed gives the same set (default 0)")
    parser.add_argument("--compare-with", metavar="DATA",
                        help="another calibration set (.npz/.npy/folder, as --calib) whose expert coverage is "
                             "shown beside EBSS's (e.g. --compare-with text.npz)")


def run_ebss(args: argparse.Namespace, *, show_progress: bool, say) -> EBSSResult:
    """Build, write and report (see the module docstring); OnnxqError for unusable input."""
    from onnxq.ir.modelio import load_model
    from onnxq.ir.outputs import calibration_files, check_outputs, files_read_by_model
    from onnxq.progress import session

    if Path(args.output).suffix != ".npz":
        raise OnnxqError(f"{args.output}: output path must end in .npz")
    reads = files_read_by_model(args.model) + calibration_files(args.compare_with, "--compare-with")
    check_outputs([("-o", args.output)], reads)
    model = load_model(args.model)
    other = _read_ids(args.compare_with, model) if args.compare_with else None  # bad data fails before generating
    with session(show_progress):
        result = build_ebss(model, sequences=args.sequences, length=args.length, width=args.width,
                            temperature=args.temperature, balance_weight=args.balance_weight, seed=args.seed,
                            show_progress=show_progress)
        other_coverage = expert_coverage(model, other, result.input_name) if other is not None else None
    result.save(args.output)
    say(coverage_report(result, other_coverage, other.shape if other is not None else None,
                        Path(args.compare_with).name if args.compare_with else None))
    say(f"wrote {args.output}")
    return result


def _read_ids(source: str, model) -> np.ndarray | None:
    """The token ids of a calibration source, [samples, sequence], checked against the model's input;
    None for a model without exactly one input (build_ebss then says what is wrong with it)."""
    from onnxq.stats.calib_data import load_calibration, model_inputs

    names = [s.name for s in model_inputs(model)]
    if len(names) != 1:
        return None
    data = load_calibration(source, model, batch_size=1, padding_mask=None)  # 1: any sample count splits
    return np.concatenate([feed[names[0]] for feed in data])


def coverage_report(result: EBSSResult, other: np.ndarray | None, other_shape: tuple[int, ...] | None,
                    other_name: str | None) -> str:
    """The per-layer table: min / median / max tokens per expert and the share std, EBSS and compared."""
    from onnxq.cli.tables import table

    headers = ["MoE layer", "EBSS tokens min / median / max", "EBSS std"]
    if other is not None:
        headers += [f"{other_name} min / median / max", f"{other_name} std"]
    rows = []
    for i, name in enumerate(result.layers or [str(i) for i in range(len(result.coverage))]):
        row = [f"{i} ({name})", _spread(result.coverage[i]), round(float(share_std(result.coverage)[i]), 4)]
        if other is not None:
            row += [_spread(other[i]), round(float(share_std(other)[i]), 4)]
        rows.append(row)
    experts = result.coverage.shape[1]
    routed = int(result.coverage[0].sum())
    per_token = max(1, round(routed / max(result.ids.size, 1)))
    title = (f"tokens routed to each of the {experts} experts per MoE layer; std: of the experts' shares "
             f"(0 even, {collapsed_std(experts, per_token):.3f} all to the same {per_token})")
    lines = [table(headers, rows, title=title), "",
             f"EBSS: {result.ids.shape[0]} sequences x {result.ids.shape[1]} tokens = {result.ids.size} tokens"]
    if other is not None:
        samples, length = other_shape
        lines.append(f"{other_name}: {samples} samples x {length} tokens = {samples * length} tokens")
    return "\n".join(lines)


def _spread(counts: np.ndarray) -> str:
    median = float(np.median(counts))
    shown = f"{median:.0f}" if median.is_integer() else f"{median:.1f}"
    return f"{counts.min()} / {shown} / {counts.max()}"
