"""The `onnxq` command line: quantize, compare, lint, report, inspect, view, build-engine, recipes, export."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import textwrap
from pathlib import Path

from onnxq.cli.parser import (  # the exit statuses are part of the command line's contract (docs/guarantees.md)
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_LINT_FAILED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_USER_ERROR,
    LOG_LEVELS,
    build_parser,
)
from onnxq.cli.tables import clean, table
from onnxq.errors import OnnxqError
from onnxq.metadata import FLOAT_REASON_KEY, RECIPE_KEY, RECIPE_REASON_KEY, TARGET_KEY


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that every write in progress is
    rolled back (a BaseException, so no `except Exception` on the way swallows it)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser({"quantize": _quantize, "compare": _compare, "lint": _lint, "report": _report,
                           "inspect": _inspect, "build-engine": _build_engine, "recipes": _recipes, "view": _view,
                           "export": _export, "ebss": _ebss})
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    args.level = LOG_LEVELS[args.log_level or ("warning" if args.quiet else "info")]
    restore = _install_handlers(args.level)
    try:
        return args.run(args) or EXIT_OK
    except OnnxqError as exc:
        _error(f"onnxq: error: {_one_line(exc)}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _error("onnxq: interrupted; no partial file left")
        return EXIT_INTERRUPTED
    except Terminated:
        _error("onnxq: terminated; no partial file left")
        return EXIT_TERMINATED
    except BrokenPipeError:  # the reader went away (`onnxq inspect m.onnx | head`): nothing to report
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # a bug in onnxq: say so in one line unless asked for the traceback
        if os.environ.get("ONNXQ_DEBUG"):
            raise
        _error(f"onnxq: internal error: {type(exc).__name__}: {_one_line(exc, '')} "
               "(set ONNXQ_DEBUG=1 for the traceback and please report it)")
        return EXIT_INTERNAL
    finally:
        restore()


class _StderrLog(logging.Handler):
    """onnxq's warnings and debug lines on stderr, one line each: "onnxq: warning: ..."."""

    def emit(self, record: logging.LogRecord) -> None:
        _error(f"onnxq: {record.levelname.lower()}: {_one_line(Exception(record.getMessage()), '')}")


def _install_handlers(level: int = logging.INFO):
    """SIGTERM behaves like Ctrl-C, library loggers stay quiet (their tracebacks are not ours to
    print; ONNXQ_DEBUG=1 shows them) and onnxq's logger prints at `level` (--log-level). Returns a
    function that undoes all three (main runs in-process in tests)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    if not os.environ.get("ONNXQ_DEBUG"):
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
    ours, handler = logging.getLogger("onnxq"), _StderrLog()
    before = (ours.level, ours.propagate)
    ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass

    def restore():
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
        ours.removeHandler(handler)
        ours.setLevel(before[0])
        ours.propagate = before[1]
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return restore


def _on_sigterm(signum, frame):
    raise Terminated()


def _error(line: str) -> None:
    print(clean(line), file=sys.stderr)


def _say(*parts) -> None:
    print(clean(" ".join(str(p) for p in parts), keep_newlines=True))


def _one_line(exc: BaseException, default: str | None = None) -> str:
    lines = str(exc).strip().splitlines()
    if lines:
        return lines[0]
    return type(exc).__name__ if default is None else default


def _quantize(args) -> int:
    from onnxq.analysis.inspection import inspect_model
    from onnxq.api import quantize
    from onnxq.ir.modelio import load_model
    from onnxq.ir.outputs import calibration_files, check_outputs, files_read_by_model
    from onnxq.pipeline import read_record
    from onnxq.quant.lint import lint, passed

    reads = files_read_by_model(args.model) + calibration_files(args.calib)
    if args.recipe and Path(args.recipe).is_file():
        reads.append(("the recipe", Path(args.recipe)))
    check_outputs([("-o", args.output), ("-o's external-data file", args.output + ".data"),
                   ("--report", args.report), ("--report-html", args.report_html)], reads)
    informed = args.level <= logging.INFO
    log = _say if informed else (lambda *_: None)
    runtime_errors = _runtime_errors()
    try:
        proto = quantize(args.model, args.calib, output=args.output, recipe=args.recipe, target=args.target,
                         per_tensor=True if args.per_tensor else None, calibrator=args.calibrator,
                         rounding=args.rounding, activation_type=args.activation_type, format=args.number_format,
                         high_precision=args.high_precision, weight_type=args.weight_type,
                         bits_budget=args.bits_budget, bit_allocation=args.bit_allocation,
                         bits_cache=args.bits_cache, agq=args.agq, calibration_shapes=args.calibration_shapes,
                         exclude=args.exclude or None,
                         op_types=[op for ops in args.op_types for op in ops] or None,
                         batch_size=args.batch_size, max_samples=args.max_samples,
                         allow_unknown_ops=args.allow_unknown_ops,
                         padding_mask=None if args.padding_mask == "none" else args.padding_mask,
                         verify_exact=not args.no_verify, show_progress=informed, log=log)
    except runtime_errors:
        _blame_data_if_float_model_fails(args)
        raise
    model = load_model(proto)
    info = inspect_model(model)
    results = lint(model, args.target)
    failed = [r.rule for r in results if r.status == "FAIL"]
    _log_pass_details(model)
    if informed:
        rows = [(r["name"], r["kind"], r["seconds"], _summary(r["summary"])) for r in read_record(model)]
        _say(table(["pass", "kind", "seconds", "result"], rows, title=f"wrote {args.output}"))
        _say(f"\nquantized ops: {info.coverage_by_count:.0%} of compute ops, {info.coverage_by_flops:.1%} of FLOPs")
        if info.nonlinear_replaced:
            _say(f"nonlinear ops replaced or quantized: {info.nonlinear_coverage:.0%} of {info.nonlinear_ops}; worst "
                 f"replacement error {max(f.get('max_steps', 0) for f in info.fidelity):.2f} INT8 output steps")
        _say(f"{args.target} lint: {'pass' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    if args.report:
        props = model.metadata_props
        _write_json(args.report, {"model": str(args.model), "output": str(args.output),
                                  "recipe": props.get(RECIPE_KEY), "recipe_reason": props.get(RECIPE_REASON_KEY),
                                  "target": props.get(TARGET_KEY),
                                  "passes": read_record(model), "coverage_by_count": info.coverage_by_count,
                                  "coverage_by_flops": info.coverage_by_flops,
                                  "nonlinear_coverage": info.nonlinear_coverage, "fidelity": info.fidelity,
                                  "lint": [vars(r) for r in results]})
    if args.report_html:
        from onnxq.api import report

        report(args.model, args.output, args.calib, args.report_html, batch_size=args.batch_size,
               max_samples=args.max_samples, padding_mask=None if args.padding_mask == "none" else args.padding_mask,
               show_progress=informed)
        log(f"wrote {args.report_html}")
    if not passed(results):
        for line in _lint_failure_lines(model, results, args):
            _error(line)
        return EXIT_LINT_FAILED
    return EXIT_OK


def _lint_failure_lines(model, results, args) -> list[str]:
    """What quantize says when its output fails lint, one line per failing rule: the nodes, and whether
    an exclusion (--exclude, --op-types, the recipe's exclude) kept them in float, which makes the
    failure the expected consequence of the user's choice rather than a bug."""
    excluded = {n.name for n in model.graph if n.metadata_props.get(FLOAT_REASON_KEY) == "excluded by the user"}
    lines = []
    for r in results:
        if r.status != "FAIL":
            continue
        nodes = list(dict.fromkeys(n for n in r.nodes if n))
        shown = ", ".join(f"'{n}'" for n in nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        ours = [n for n in nodes if n in excluded]
        if nodes and len(ours) == len(nodes):
            why = (" (kept in float by your exclusion: --exclude, --op-types or the recipe's exclude; the target "
                   "runs such nodes in floating point)")
        elif ours:
            why = f" ({len(ours)} of them kept in float by your exclusion: --exclude, --op-types or the recipe's exclude)"
        else:
            why = ""
        lines.append(f"onnxq: lint failed: wrote {args.output}, but it breaks {args.target} rule {r.rule} "
                     f"({r.title}) at {shown or 'the model'}{why} (exit status {EXIT_LINT_FAILED}; "
                     f"details: onnxq lint {args.output} --target {args.target})")
    return lines


def _log_pass_details(model) -> None:
    """--log-level debug: every pass's options, full summary, time and measured change."""
    from onnxq.api import logger
    from onnxq.pipeline import read_record

    if not logger.isEnabledFor(logging.DEBUG):
        return
    for i, r in enumerate(read_record(model), 1):
        change = "" if r.get("max_rel_change") is None else f"; max relative output change {r['max_rel_change']:.2e}"
        logger.debug(f"pass {i} {r['name']} ({r['kind']}, {r['seconds']} s{change}): "
                     f"options {json.dumps(r['options'], default=str)}; result {json.dumps(r['summary'], default=str)}")


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises when running a model fails."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return state.InvalidArgument, state.RuntimeException, state.Fail


def _blame_data_if_float_model_fails(args) -> None:
    """ONNX Runtime failed during quantize. If the untouched model fails on the calibration data too,
    the data is the problem (an index out of range, a shape the graph cannot take): say so in one
    line. Otherwise an onnxq rewrite broke the graph, a bug the caller reports as internal."""
    from onnxq.analysis.compare import run_on_data
    from onnxq.ir.modelio import load_model
    from onnxq.runtime.session import session
    from onnxq.stats.calib_data import load_calibration

    model = load_model(args.model)
    data = load_calibration(args.calib, model, batch_size=args.batch_size, limit=args.max_samples)
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    for feed in data:
        run_on_data(sess, names, feed, f"{args.model} (unchanged)")  # raises OnnxqError on the failing batch


def _summary(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))


def _compare(args) -> int:
    from onnxq.analysis.compare import compare_models
    from onnxq.ir.modelio import load_model
    from onnxq.ir.outputs import calibration_files, check_outputs, files_read_by_model

    reads = (files_read_by_model(args.reference, "the reference model")
             + files_read_by_model(args.quantized, "the quantized model") + calibration_files(args.data, "the data"))
    check_outputs([("--json", args.json)], reads)
    result = compare_models(load_model(args.reference), load_model(args.quantized), args.data,
                            layers=args.layers != 0, max_samples=args.max_samples, batch_size=args.batch_size,
                            padding_mask=None if args.padding_mask == "none" else args.padding_mask,
                            show_progress=args.level <= logging.INFO)
    rows = [(o["name"], o["verdict"], "-", "-", "-", "-") if o["kind"] == "integer" else
            (o["name"], "float", f"{o['cosine']:.6f}", o["sqnr_db"], o["max_abs_error"],
             o["classes"] if o["top1_agreement"] is None else f"{o['top1_agreement']:.2%}")
            for o in result["outputs"]]
    title = f"{result['samples']} samples" + (f"; positions where '{result['padding_mask']}' is 0 left out"
                                               if result["padding_mask"] else "")
    _say(table(["output", "kind", "cosine", "SQNR dB", "max |err|", "top-1 agree"], rows, title=title))
    layers = result["layers"] if args.layers < 0 else result["layers"][:args.layers]
    if layers:
        _say()
        _say(table(["tensor", "SQNR dB"], [(row["tensor"], row["sqnr_db"]) for row in layers],
                   title="layers with the lowest SQNR (the ones that hurt most)"))
    if args.json:
        _write_json(args.json, result)
    return EXIT_OK


def _report(args) -> int:
    from onnxq.api import report
    from onnxq.ir.outputs import calibration_files, check_outputs, files_read_by_model

    reads = (files_read_by_model(args.reference, "the reference model")
             + files_read_by_model(args.quantized, "the quantized model") + calibration_files(args.data, "the data"))
    check_outputs([("-o", args.output)], reads)
    result = report(args.reference, args.quantized, args.data, args.output, batch_size=args.batch_size,
                    max_samples=args.max_samples, padding_mask=None if args.padding_mask == "none" else args.padding_mask,
                    show_progress=args.level <= logging.INFO)
    worst = result["layers"][0] if result["layers"] else None
    _say(f"wrote {args.output}: {result['samples']} samples"
         + (f"; worst layer '{worst['tensor']}' at {worst['sqnr_db']:.2f} dB SQNR" if worst else ""))
    return EXIT_OK


def _lint(args) -> int:
    from onnxq.ir.modelio import load_model
    from onnxq.ir.outputs import check_outputs, files_read_by_model
    from onnxq.quant.lint import lint, passed

    check_outputs([("--json", args.json)], files_read_by_model(args.model))
    results = lint(load_model(args.model), args.target)
    shown = None if args.verbose else 3
    rows = []
    for r in results:
        example = "; ".join(r.violations[:shown]) + (" …" if shown and len(r.violations) > shown else "")
        rows.append((r.rule, r.status, len(r.violations), r.title, example))
    _say(table(["rule", "status", "count", "what it checks", "violations"], rows,
               title=f"{args.model}: {args.target} Q/DQ rules"))
    ok = passed(results)
    _say(f"\n{'PASS' if ok else 'FAIL'}: {sum(r.status == 'FAIL' for r in results)} error(s), "
         f"{sum(r.status == 'warn' for r in results)} warning(s)")
    if args.json:
        _write_json(args.json, [vars(r) for r in results])
    return EXIT_OK if ok else EXIT_LINT_FAILED


def _inspect(args) -> int:
    from onnxq.analysis.inspection import inspect_model
    from onnxq.ir.modelio import load_model
    from onnxq.ir.outputs import check_outputs, files_read_by_model

    check_outputs([("--json", args.json)], files_read_by_model(args.model))
    info = inspect_model(load_model(args.model))
    ops = sorted(info.op_counts.items(), key=lambda kv: -kv[1])
    _say(table(["op", "count", "quantized"], [(op, n, info.quantized_op_counts.get(op, 0)) for op, n in ops],
               title=f"{args.model} (opset {info.opset}, {info.total_gflops:.3f} GFLOPs)"))
    if info.qdq:
        _say("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(info.qdq.items())))
    _say(f"\nquantized coverage: {info.coverage_by_count:.1%} of compute ops, {info.coverage_by_flops:.1%} of FLOPs"
         + (f" (each of the {info.replacements} replaced nonlinear ops counted as one op)" if info.replacements else ""))
    if info.nonlinear_ops:
        _say(f"nonlinear-op coverage: {info.nonlinear_coverage:.1%} of {info.nonlinear_ops} nonlinear/normalisation ops "
             f"({info.nonlinear_replaced} replaced by tables or integer subgraphs, {info.nonlinear_quantized} with "
             "quantized inputs)")
    if info.fidelity:
        rows = [(f.get("node", ""), f.get("function", ""), f.get("method", ""),
                 "-" if f.get("max_steps") is None else f"{f['max_steps']:.3f}",
                 "-" if f.get("mean_steps") is None else f"{f['mean_steps']:.3f}",
                 "yes" if f.get("input_quantized") else "no") for f in info.fidelity]
        _say("\n" + table(["node", "function", "replaced by", "max err (steps)", "mean err (steps)", "int input"], rows,
                           title="replaced nonlinear ops: error over the calibrated range, in INT8 output steps"))
    if RECIPE_KEY in info.metadata:  # which recipe ran, why it was chosen, for which target
        reason = info.metadata.get(RECIPE_REASON_KEY)
        _say(f"\nrecipe: {info.metadata[RECIPE_KEY]}" + (f" ({reason})" if reason else "")
             + (f"; target: {info.metadata[TARGET_KEY]}" if TARGET_KEY in info.metadata else ""))
    if info.passes:
        rows = [(i + 1, p["name"], p["kind"], _summary(p["summary"])) for i, p in enumerate(info.passes)]
        _say("\n" + table(["#", "pass", "kind", "result"], rows, title="passes applied"))
    if info.weight_widths:
        total = sum(w for _, w in info.weight_widths.values()) or 1
        rows = [(bits, tensors, values, f"{values / total:.1%}") for bits, (tensors, values) in info.weight_widths.items()]
        average = sum(bits * w for bits, (_, w) in info.weight_widths.items()) / total
        _say("\n" + table(["bits", "weight tensors", "values", "share"], rows,
                           title=f"weight widths chosen by allocate_bits (average {average:.2f} bits)"))
    if info.float_reasons:
        rows = [(len(nodes), reason, ", ".join(nodes[:2]) + (" …" if len(nodes) > 2 else ""))
                for reason, nodes in sorted(info.float_reasons.items(), key=lambda kv: -len(kv[1]))]
        _say("\n" + table(["count", "kept in float because", "e.g."], rows, title="ops left in float, and why"))
    if args.json:
        _write_json(args.json, vars(info))
    return EXIT_OK


def _view(args) -> int:
    from onnxq.cli.view import view

    view(args.model, port=args.port, browse=not args.no_browser, say=_say)
    return EXIT_OK


def _export(args) -> int:
    from onnxq.cli.export_cmd import run_export

    run_export(args.source, args.output, seq_len=args.seq_len, batch=args.batch, opset=args.opset,
               exporter=args.exporter, log=_say if args.level <= logging.INFO else (lambda *_: None))
    return EXIT_OK


def _ebss(args) -> int:
    from onnxq.cli.ebss_cmd import run_ebss

    run_ebss(args, show_progress=args.level <= logging.INFO, say=_say)
    return EXIT_OK


def _build_engine(args) -> int:
    from onnxq.ir.outputs import check_outputs, files_read_by_model
    from onnxq.runtime.tensorrt import build_engine, parse_shapes

    if not Path(args.model).is_file():
        raise OnnxqError(f"{args.model}: no such file")
    check_outputs([("-o", args.output)], files_read_by_model(args.model))
    precisions = build_engine(args.model, args.output, shapes=parse_shapes(args.shapes), workspace_mb=args.workspace_mb)
    _say(table(["precision", "layers"], sorted(precisions.items()), title=f"wrote {args.output}"))
    return EXIT_OK


def _recipes(args) -> int:
    import yaml

    from onnxq.pipeline.recipes import RECIPE_DIR, builtin_recipes
    from onnxq.pipeline.registry import pass_class, pass_names

    rows = []
    for name in builtin_recipes():
        spec = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
        rows.append((name, spec.get("description", ""), spec.get("cost", "")))
    print(table(["recipe", "what it does", "time it takes (2-core CPU unless said)"], rows,
                title="built-in recipes (onnxq quantize --recipe NAME)"))
    rows = [(name, cls.kind.value, textwrap.shorten((cls.__module__ and sys.modules[cls.__module__].__doc__ or "").split("\n")[0], 90))
            for name, cls in ((n, pass_class(n)) for n in pass_names())]
    print("\n" + table(["pass", "kind", "what it does"], rows, title="passes a recipe can name"))
    return 0


def _write_json(path: str, data) -> None:
    """Standard JSON: inf, -inf and NaN (an SQNR of identical tensors, a non-finite reference) as strings."""
    from onnxq.ir.outputs import write_text

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    write_text(path, json.dumps(finite(data), indent=2, default=str, allow_nan=False))


if __name__ == "__main__":
    sys.exit(main())
