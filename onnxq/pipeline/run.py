"""Running a recipe: the passes in order, each checked, exact ones verified, what ran recorded.

After every pass the pipeline removes unused nodes, names anonymous ones, runs the ONNX checker
and strict shape inference, and, for passes declared exact, compares the outputs on the first
calibration batch with those before the pass (a relative change above the tolerance is a bug in
the pass and stops the run). The outputs are computed only where an exact pass needs them (before
and after it), so approximate passes at the end of a recipe cost no extra run.

A model with more than SPILL_THRESHOLD_BYTES of weights keeps its float weights on disk between
passes (onnxq.ir.spill), so its resident memory does not hold a float copy of every layer; the
model comes back with its usual tensors.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.errors import OnnxqError
from onnxq.ir.checks import check_model, infer_shapes, input_problem
from onnxq.ir.graph import name_anonymous
from onnxq.ir.modelio import LARGE_TENSOR_BYTES, weight_bytes
from onnxq.ir.spill import WeightSpill, spilling
from onnxq.pipeline.passes import QDQ_OPS, GraphPass, Kind, PassContext
from onnxq.pipeline.record import PassRecord, ir_version_for, read_record, write_record
from onnxq.progress import bar_safe, progress, session

SPILL_THRESHOLD_BYTES = 256 << 20  # models with more weights than this keep float weights on disk ...
SPILL_TENSOR_BYTES = LARGE_TENSOR_BYTES  # ... those of at least this size


def run_pipeline(model: ir.Model, passes: list[GraphPass], ctx: PassContext, *, verify_exact: bool = True,
                 exact_tolerance: float = 1e-4, recipe_name: str = "") -> list[PassRecord]:
    """Run `passes` on `model` in place, checking after each; return (and record) what ran."""
    spill = WeightSpill(SPILL_TENSOR_BYTES) if weight_bytes(model) > SPILL_THRESHOLD_BYTES else None
    try:
        with session(ctx.show_progress), spilling(spill):
            return _run(model, passes, dataclasses.replace(ctx, log=bar_safe(ctx.log)), verify_exact=verify_exact,
                        exact_tolerance=exact_tolerance, recipe_name=recipe_name, spill=spill)
    finally:
        if spill is not None:  # also after a failure: the caller's model must not point into a deleted folder
            spill.restore(model)
            spill.close()


def _run(model: ir.Model, passes: list[GraphPass], ctx: PassContext, *, verify_exact: bool,
         exact_tolerance: float, recipe_name: str, spill: WeightSpill | None) -> list[PassRecord]:
    quantized = sorted({n.op_type for n in model.graph if n.op_type in QDQ_OPS})
    if quantized and not read_record(model):
        raise OnnxqError(f"the model already contains {', '.join(quantized)} nodes: give onnxq the floating-point model")
    strict, known_problem = input_problem(model)
    if spill is not None:
        spill.absorb(model)
    infer_shapes(model)
    probe = ctx.calibration.first() if (verify_exact and ctx.calibration is not None) else None
    exact = [p.kind is Kind.EXACT for p in passes]
    reference = _outputs(model, probe) if probe is not None and exact[:1] == [True] else None
    records = []
    for i, graph_pass in enumerate(progress(passes, desc="passes", unit="pass", disable=not ctx.show_progress,
                                                 item_name=lambda p: p.name)):
        start = time.perf_counter()
        graph_pass.requires(model)
        summary = graph_pass.apply(model, ctx) or {}
        RemoveUnusedNodesPass()(model)  # passes leave replaced constants behind; drop them here, once
        name_anonymous(model.graph)
        if spill is not None:
            spill.absorb(model)
        check_model(model, strict=strict, what=f"after pass '{graph_pass.name}'", tolerate=known_problem)
        infer_shapes(model)
        graph_pass.ensures(model)
        record = PassRecord(graph_pass.name, graph_pass.kind.value, graph_pass.options(), summary,
                            round(time.perf_counter() - start, 3))
        # the outputs serve this pass's check if it is exact, and the next pass's if that one is
        if probe is not None and (exact[i] or exact[i + 1:i + 2] == [True]):
            outputs = _outputs(model, probe)
            if exact[i]:
                record.max_rel_change = _max_rel_change(reference, outputs)
                if record.max_rel_change > exact_tolerance:
                    raise OnnxqError(f"pass '{graph_pass.name}' is declared exact but changed the outputs by "
                                     f"{record.max_rel_change:.2e} relative (tolerance {exact_tolerance:.0e}); "
                                     "this is a bug in the pass, please report it")
            reference = outputs
        records.append(record)
    write_record(model, records, recipe_name, ctx.target)
    model.ir_version = ir_version_for(model)
    return records


def _outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # deferred: ORT start-up is only paid when verifying
    from onnxq.runtime.segments import SegmentedModel, worth_segmenting
    from onnxq.runtime.session import session

    if worth_segmenting(model):
        taken = {i.name for i in model.graph.inputs}
        return SegmentedModel(model, [o.name for o in model.graph.outputs]).collect(
            [{k: v for k, v in feed.items() if k in taken}])[0]
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    taken = {i.name for i in sess.get_inputs()}  # a pass may have removed an input (pe_fold folds a constant one)
    return dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in taken})))


def _max_rel_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, ref in before.items():
        if name not in after or not np.issubdtype(ref.dtype, np.floating):
            continue
        scale = max(float(np.abs(ref).max(initial=0.0)), 1e-12)
        worst = max(worst, float(np.abs(after[name].astype(np.float64) - ref).max(initial=0.0)) / scale)
    return worst
