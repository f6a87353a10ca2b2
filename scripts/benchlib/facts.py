"""What the benchmarks report about a model besides its task metric: the TensorRT lint verdict, how
much of it is quantized, which nonlinear ops stay in float and how closely replaced ones follow their
function, and the largest output change the pipeline measured for an exact pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchlib import repo_relative


def lint_verdict(model) -> dict:
    """{'lint': 'pass' | 'FAIL R1 (n), ...'} and, when failing, a few violations under 'lint_examples'."""
    from onnxq.quant.lint import lint

    failed = [r for r in lint(model) if r.status == "FAIL"]
    if not failed:
        return {"lint": "pass"}
    return {"lint": "FAIL " + ", ".join(f"{r.rule} ({len(r.violations)})" for r in failed),
            "lint_examples": [v for r in failed for v in r.violations[:2]]}


def exact_change(model) -> dict:
    """The largest relative output change of any exact pass, as the pipeline measured it (None if unmeasured)."""
    from onnxq.pipeline import read_record

    exact = [r.get("max_rel_change") for r in read_record(model) if r.get("kind") == "exact"]
    exact = [x for x in exact if x is not None]
    return {"exact_passes_max_rel_change": float(f"{max(exact):.2e}") if exact else None}


def coverage(model) -> dict:
    """Quantized share (by node count and by FLOPs), nonlinear ops replaced and left, and the fidelity
    of the replaced functions in INT8 output steps."""
    from onnxq.analysis.inspection import inspect_model
    from onnxq.quant.qdq_rules import NONLINEAR, NORMALISATION

    info = inspect_model(model)
    fid = info.fidelity
    remaining = set(NONLINEAR) | set(NORMALISATION)  # what a fully quantized graph replaces; left, they run in float
    return {"nodes": sum(info.op_counts.values()) + sum(info.qdq.values()),
            "coverage_by_count": round(info.coverage_by_count, 4), "coverage_by_flops": round(info.coverage_by_flops, 4),
            "nonlinear_ops": info.nonlinear_ops, "nonlinear_replaced": info.nonlinear_replaced,
            "nonlinear_coverage": round(info.nonlinear_coverage, 4),
            "remaining_nonlinear": sorted({op for op in info.op_counts if op in remaining}),
            "fidelity_max_steps": {f: round(max(e["max_steps"] for e in fid if e["function"] == f), 3)
                                   for f in sorted({e["function"] for e in fid if "max_steps" in e})},
            "fidelity_mean_steps": {f: round(float(np.mean([e["mean_steps"] for e in fid if e["function"] == f])), 3)
                                    for f in sorted({e["function"] for e in fid if "mean_steps" in e})}}


def model_facts(path: str | Path, *, with_coverage: bool = True) -> dict:
    """Everything above for the model at `path` (its path repository-relative). `with_coverage=False`
    skips the inspection, which costs minutes on a large language model."""
    from onnxq.ir.modelio import load_model

    model = load_model(str(path))
    facts = {"path": repo_relative(path), **lint_verdict(model), **exact_change(model)}
    if with_coverage:
        facts.update(coverage(model))
    return facts
