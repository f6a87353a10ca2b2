"""The `onnxq` command line's parser: sub-commands, options, their types and the exit statuses."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from onnxq.cli.help import (
    COMPARE_DESCRIPTION,
    DESCRIPTION,
    EXPORT_DESCRIPTION,
    LINT_DESCRIPTION,
    QUANTIZE_EPILOG,
    REPORT_DESCRIPTION,
)
from onnxq.cli.tables import clean

# Exit statuses (docs/guarantees.md): what a script calling onnxq can rely on.
EXIT_OK = 0
EXIT_USER_ERROR = 1     # bad input: one line "onnxq: error: ..." on stderr, nothing written
EXIT_USAGE = 2          # bad command line (unknown option, missing argument, value of the wrong form or range)
EXIT_INTERNAL = 3       # a bug in onnxq: "onnxq: internal error: ..."
EXIT_LINT_FAILED = 4    # the model is fine to read but breaks an error-level rule of its target (lint), or
                        # quantize wrote its output and that output fails lint (stderr names rule and nodes,
                        # and says when --exclude/--op-types caused it)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); 143 for SIGTERM: temporary files removed, no partial output
EXIT_TERMINATED = 143

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_USER_ERROR}    bad input (model, data, recipe, output path): one line "onnxq: error: ..."
  {EXIT_USAGE}    bad command line (unknown option, missing argument, value of the wrong form or range)
  {EXIT_INTERNAL}    internal error (a bug in onnxq; ONNXQ_DEBUG=1 shows the traceback)
  {EXIT_LINT_FAILED}    lint failed (lint), or quantize wrote its output but that output fails lint; stderr names
       the rule and the nodes, and says so when your --exclude/--op-types kept them in float
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); {EXIT_TERMINATED} terminated (SIGTERM); nothing is left half-written

log levels (--log-level, every command): error: errors only; warning: also warnings (-q);
  info: also progress and what each step did (default); debug: also per-pass options and details
  (e.g. onnxq quantize m.onnx --calib c.npz -o q.onnx --log-level debug)"""

LOG_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaint on one line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, clean(f"onnxq: error: {message} (see {self.prog} --help)") + "\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


_positive.__name__ = "positive integer"  # argparse names the type in its message


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError
    return value


_port.__name__ = "port (1-65535)"


def _layers(text: str) -> int:
    value = int(text)
    if value < -1:
        raise ValueError
    return value


_layers.__name__ = "count (-1 for all)"


def _pattern(text: str) -> str:
    from onnxq.arguments import regex_problem

    problem = regex_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _shapes(text: str) -> dict[str, tuple[int, ...]]:
    from onnxq.errors import OnnxqError
    from onnxq.stats.calib_shapes import parse_shapes

    try:
        return parse_shapes(text)
    except OnnxqError as exc:  # a malformed value is a usage error (exit 2), as for every option
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bits_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits, e.g. 4 or 3.5, not {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{text}: the average weight bits must lie between 2 and 8")
    return value


def _op_list(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",")]
    if not all(ops):
        raise argparse.ArgumentTypeError(f"'{text}' has an empty op type (give e.g. Conv,MatMul)")
    return ops


def _evaluation_options() -> argparse.ArgumentParser:
    """--data, --max-samples, --batch-size and --padding-mask, shared by compare and report."""
    evaluation = argparse.ArgumentParser(add_help=False)
    evaluation.add_argument("--data", required=True, help="evaluation data, same formats as --calib")
    evaluation.add_argument("--max-samples", type=_positive, help="use at most this many samples")
    evaluation.add_argument("--batch-size", type=_positive, default=1,
                            help="samples per run for models with a dynamic batch (default 1; e.g. --batch-size 32); "
                                 "samples past the last whole batch are left out, with a warning")
    evaluation.add_argument("--padding-mask", default="auto", metavar="INPUT",
                            help="integer or bool input whose zeros mark padded positions, left out of every metric "
                                 "as quantize leaves them out of calibration (default auto: an input named "
                                 "attention_mask; 'none' counts every position; e.g. --padding-mask attention_mask)")
    return evaluation


def _log_options() -> argparse.ArgumentParser:
    """--log-level and -q, shared by every command."""
    common = argparse.ArgumentParser(add_help=False)
    levels = common.add_mutually_exclusive_group()  # -q is a log level: naming both would leave one ignored
    levels.add_argument("--log-level", choices=list(LOG_LEVELS),
                        help="error: errors only; warning: also warnings; info: also progress and what each step "
                             "did (default); debug: also per-pass options and details (e.g. --log-level debug)")
    levels.add_argument("-q", "--quiet", action="store_true",
                        help="same as --log-level warning: no progress or info, warnings and errors still shown")
    return common


def build_parser(runners: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The `onnxq` parser; `runners[command]` is what each sub-command's `run` default calls."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="onnxq", description=DESCRIPTION, formatter_class=formatter,
                     epilog=EXIT_STATUS_HELP)
    from onnxq import __version__

    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common, evaluation = [_log_options()], _evaluation_options()

    q = sub.add_parser("quantize", help="quantize an FP32 ONNX model to INT8 Q/DQ", description=DESCRIPTION.split("\n\n")[0],
                       epilog=QUANTIZE_EPILOG, formatter_class=formatter, parents=common)
    q.add_argument("model", help="FP32 .onnx model")
    q.add_argument("--calib", required=True, metavar="DATA", help="calibration data: .npz/.npy file or folder")
    q.add_argument("-o", "--output", required=True, help="where to write the quantized .onnx model")
    q.add_argument("--recipe", help="built-in recipe name or YAML/JSON recipe file (default: chosen for the model)")
    q.add_argument("--target", default="tensorrt", choices=["tensorrt", "ort-cpu"], help="deployment target (default tensorrt)")
    q.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per output channel")
    q.add_argument("--calibrator", choices=["max", "percentile", "entropy", "mse", "auto"], help="activation calibrator (default: the recipe's)")
    q.add_argument("--activation-type", choices=["int8", "uint8"],
                   help="activation integers where the target takes both: --target ort-cpu defaults to uint8 "
                        "(fastest on x86); int8 for CPUs whose kernels prefer S8S8 (e.g. --activation-type int8)")
    q.add_argument("--weight-type", choices=["int8", "uint8"],
                   help="weight integers for --target ort-cpu: int8 (default, ORT's U8S8 kernels) or uint8 (stored "
                        "q + 128 with zero point 128, for CPUs whose kernels want U8U8), e.g. --weight-type uint8")
    q.add_argument("--format", choices=["int8", "fp8"], dest="number_format",
                   help="int8 (default) or fp8: FP8 E4M3 weights and activations for TensorRT on Hopper/Ada GPUs "
                        "(opset 21; calibrated with max unless --calibrator names percentile or auto), e.g. --format fp8")
    q.add_argument("--high-precision", choices=["fp32", "fp16"], default="fp32",
                   help="type of what stays in float, and of the model's inputs and outputs: fp32 (default: the "
                        "model's own float type, unchanged) or fp16 "
                        "(ModelOpt's --high_precision_dtype; TensorRT then runs those layers in FP16), e.g. "
                        "--high-precision fp16")
    q.add_argument("--rounding", choices=["nearest", "gptq", "adaround", "flexround"],
                   help="weight rounding (default: the recipe's): gptq chooses the integers against each layer's "
                        "calibration inputs; adaround/flexround learn them block by block (all use torch; "
                        "they matter most at 4 bits)")
    q.add_argument("--bits-budget", type=_bits_budget, metavar="AVG",
                   help="mixed-precision weights: each MatMul/Gemm gets 2, 3, 4, 6 or 8 bits, averaging at most AVG "
                        "bits per weight (opset 21 INT4 below 5 bits), e.g. --bits-budget 4 --bit-allocation sensitivity")
    q.add_argument("--bit-allocation", choices=["luq", "sensitivity", "uniform"], default="luq",
                   help="how --bits-budget chooses the widths: luq (default; layers whose outputs have lower entropy "
                        "get fewer bits, one calibration pass), sensitivity (the model's output error measured per "
                        "layer and width: slower, usually better) or uniform")
    q.add_argument("--bits-cache", metavar="JSON",
                   help="with --bit-allocation sensitivity: keep the measured errors in this file and reuse them "
                        "(several budgets, one measurement)")
    q.add_argument("--agq", action="store_true",
                   help="mixture-of-experts models: weigh each expert's GPTQ statistics by its router gate, so "
                        "tokens routed elsewhere do not count (needs GPTQ rounding, as the transformer recipes use)")
    q.add_argument("--batch-size", type=_positive, default=1, help="calibration batch size for models with a dynamic batch (default 1)")
    q.add_argument("--calibration-shapes", metavar="SHAPES", type=_shapes,
                   help="the exact shape of every calibration batch, per input (the first dimension is the batch "
                        "size; the model keeps its dynamic dims), e.g. --calibration-shapes "
                        "input_ids:8x128,attention_mask:8x128")
    q.add_argument("--max-samples", type=_positive, help="use at most this many calibration samples")
    q.add_argument("--padding-mask", default="auto", metavar="INPUT",
                   help="integer or bool input whose zeros mark padded positions, left out of calibration "
                        "statistics (default auto: an input named attention_mask; 'none' counts every position)")
    q.add_argument("--exclude", action="append", type=_pattern, default=[], metavar="NODE_OR_REGEX",
                   help="keep this node in float: a node name or a Python regular expression matched against whole "
                        "node names; repeatable (e.g. --exclude fc/Gemm --exclude '/head/.*'); a pattern matching no "
                        "node is a warning")
    q.add_argument("--op-types", action="append", type=_op_list, default=[], metavar="OP[,OP...]",
                   help="quantize only nodes of these op types, the rest stays float (e.g. --op-types Conv,MatMul)")
    q.add_argument("--allow-unknown-ops", action="store_true", help="keep ops with no QDQ rule in float instead of failing")
    q.add_argument("--no-verify", action="store_true", help="skip the numerical check of exact passes")
    q.add_argument("--report", metavar="JSON", help="also write what ran, coverage and lint results as JSON")
    q.add_argument("--report-html", metavar="HTML",
                   help="also write the report page (see `onnxq report`) comparing the output with the model on the "
                        "calibration data (e.g. --report-html report.html)")
    q.set_defaults(run=runners["quantize"])

    c = sub.add_parser("compare", help="FP32 vs quantized: per-output and per-layer error", formatter_class=formatter,
                       description=COMPARE_DESCRIPTION, parents=[*common, evaluation])
    c.add_argument("reference", help="the FP32 model")
    c.add_argument("quantized", help="the quantized model")
    c.add_argument("--layers", type=_layers, default=10, help="how many of the worst layers to list (0: none, -1: all)")
    c.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    c.set_defaults(run=runners["compare"])

    rp = sub.add_parser("report", help="one HTML page showing what a quantization did", formatter_class=formatter,
                        description=REPORT_DESCRIPTION, parents=[*common, evaluation])
    rp.add_argument("reference", help="the FP32 model")
    rp.add_argument("quantized", help="the quantized model (written by onnxq)")
    rp.add_argument("-o", "--output", required=True, help="the HTML page to write")
    rp.set_defaults(run=runners["report"])

    lt = sub.add_parser("lint", help="check the Q/DQ rules of a target (TensorRT, ORT CPU), rule by rule",
                        formatter_class=formatter, description=LINT_DESCRIPTION, parents=common)
    lt.add_argument("model")
    lt.add_argument("--target", default="tensorrt", choices=["tensorrt", "ort-cpu"],
                    help="rule profile: tensorrt (default) or ort-cpu (e.g. --target ort-cpu)")
    lt.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    lt.add_argument("-v", "--verbose", action="store_true", help="list every violation, not only the first ones")
    lt.set_defaults(run=runners["lint"])

    i = sub.add_parser("inspect", help="ops, quantized coverage, passes applied, float ops and why",
                       formatter_class=formatter, parents=common)
    i.add_argument("model")
    i.add_argument("--json", metavar="FILE", help="also write the inspection as JSON")
    i.set_defaults(run=runners["inspect"])

    v = sub.add_parser("view", help="open a model in Netron, with onnxq's record on the model and its nodes",
                       description="Serve the model in Netron (the graph viewer) on localhost and open it in a browser.\n"
                                   "onnxq's record is under the model's properties (recipe, target, passes) and on each\n"
                                   "node (why it is quantized or float). Ctrl-C stops it (exit status 0: stopping is\n"
                                   "how it ends). Needs: pip install 'onnxq[view]'.\n\n"
                                   "  onnxq view model.int8.onnx\n"
                                   "  onnxq view model.int8.onnx --port 8081 --no-browser   (on a remote machine)",
                       formatter_class=formatter, parents=common)
    v.add_argument("model")
    v.add_argument("--port", type=_port, default=8080, help="port on localhost (default 8080, e.g. --port 8081)")
    v.add_argument("--no-browser", action="store_true", help="only serve; open the printed address yourself")
    v.set_defaults(run=runners["view"])

    b = sub.add_parser("build-engine", help="build a strongly typed TensorRT engine (needs tensorrt)", formatter_class=formatter,
                       description="Parse the Q/DQ model with TensorRT's ONNX parser into a strongly typed network (no\n"
                                   "precision flags), build it, write the engine, and report the layers' precisions.",
                       parents=common)
    b.add_argument("model")
    b.add_argument("-o", "--output", required=True, help="engine file to write (.plan)")
    b.add_argument("--shapes", help="shapes for dynamic inputs, e.g. input:1x3x224x224,mask:1x128")
    b.add_argument("--workspace-mb", type=_positive, default=4096)
    b.set_defaults(run=runners["build-engine"])

    e = sub.add_parser("export", help="export a PyTorch model (Hugging Face folder or file.py:factory) to ONNX",
                       description=EXPORT_DESCRIPTION, formatter_class=formatter, parents=common)
    e.add_argument("source", help="Hugging Face model folder, or file.py:factory returning (module, example_inputs)")
    e.add_argument("-o", "--output", required=True, help="where to write the .onnx model")
    e.add_argument("--seq-len", type=_positive, default=16, help="sequence length of the example inputs (default 16)")
    e.add_argument("--batch", type=_positive, default=2, help="batch of the example inputs (default 2)")
    e.add_argument("--opset", type=_positive, help="ONNX opset (default: 18 for dynamo, 17 for TorchScript)")
    e.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="auto (default): dynamo, falling back to TorchScript if dynamo fails")
    e.set_defaults(run=runners["export"])

    from onnxq.cli import ebss_cmd  # the ebss sub-command's help and options live with it

    eb = sub.add_parser("ebss", help="build an expert-balanced calibration set for a mixture-of-experts LM (EBSS)",
                        description=ebss_cmd.EBSS_DESCRIPTION, formatter_class=formatter, parents=common)
    ebss_cmd.add_arguments(eb)
    eb.set_defaults(run=runners["ebss"])

    r = sub.add_parser("recipes", help="list the built-in recipes and the passes they can use", parents=common)
    r.set_defaults(run=runners["recipes"])
    return parser
