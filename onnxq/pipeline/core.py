"""The pass pipeline: passes, recipes, and the record of what ran.

A pass is a small dataclass whose fields are its options, with a `name` and a declared `kind`:
- exact: floating-point outputs are unchanged (the pipeline verifies this on calibration data);
- approximate: outputs change within a bound the pass documents and its tests measure;
- needs-retraining: the pass swaps in weights that only retraining can produce.

A pass that changes the values of an intermediate tensor (rescaling, rotation) renames it (for
example `x` → `x_equalized`), so tools that match tensors by name never compare unlike values.

A recipe names passes and their options (YAML/JSON file, built-in name, or Python list). The
pipeline runs them in order, checks the model after each one, verifies exact passes numerically,
and writes what ran (options, versions, summaries) into the model's metadata_props for Netron.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import yaml
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import __version__
from onnxq.stats.calib_data import CalibrationSet
from onnxq.ir.checks import check_model, infer_shapes, input_problem
from onnxq.errors import OnnxqError
from onnxq.ir.graph import name_anonymous
from onnxq.pipeline.registry import pass_class
from onnxq.progress import progress

RECIPE_DIR = Path(__file__).parents[1] / "recipes"
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                  "ConvInteger", "MatMulInteger"}


class Kind(str, enum.Enum):
    EXACT = "exact"
    APPROXIMATE = "approximate"
    RETRAIN = "needs-retraining"


@dataclass
class PassContext:
    """What passes may use besides the model: calibration data, the target, shared notes."""

    calibration: CalibrationSet | None = None
    target: str = "tensorrt"
    notes: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    show_progress: bool = True

    def require_calibration(self, pass_name: str) -> CalibrationSet:
        if self.calibration is None:
            raise OnnxqError(f"pass '{pass_name}' needs calibration data (give --calib)")
        return self.calibration


class GraphPass:
    """Base of every pass; subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str]
    kind: ClassVar[Kind]

    def apply(self, model: ir.Model, ctx: PassContext) -> dict[str, Any]:
        """Rewrite `model` in place; return a short summary (counts) for the record."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def make_pass(name: str, options: dict[str, Any] | None = None) -> GraphPass:
    cls = pass_class(name)
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise OnnxqError(f"pass '{name}' has no option {unknown[0]!r} (its options: {', '.join(sorted(known)) or 'none'})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise OnnxqError(f"pass '{name}': bad options ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Recipes


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path | list | None, *, default: str = "default",
                _including: tuple[str, ...] = ()) -> tuple[str, list[GraphPass]]:
    """Resolve `recipe` (file, built-in name, list of steps, or None for `default`) into passes.
    `_including`: the recipes whose `include` steps led here (to stop include cycles)."""
    if recipe is None:
        recipe = default
    if isinstance(recipe, list):
        return "<python>", _steps(recipe, _including)
    path = Path(recipe)
    if not path.exists():
        builtin = RECIPE_DIR / f"{recipe}.yaml"
        if not builtin.exists():
            raise OnnxqError(f"recipe '{recipe}' is neither a file nor a built-in recipe "
                             f"(built-in: {', '.join(builtin_recipes())})")
        path = builtin
    try:
        text = path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise OnnxqError(f"{path}: cannot read recipe ({str(exc).splitlines()[0]})") from None
    steps = spec.get("passes") if isinstance(spec, dict) else spec
    if not isinstance(steps, list) or not steps:
        raise OnnxqError(f"{path}: a recipe needs a non-empty list under 'passes'")
    passes = _steps(steps, _including + (path.stem,))
    for graph_pass in passes:  # files a step names (qfpe's weights) are found relative to its recipe file
        if getattr(graph_pass, "recipe_dir", None) is None:
            graph_pass.recipe_dir = path.resolve().parent
    return path.stem, passes


def _steps(specs: list, including: tuple[str, ...]) -> list[GraphPass]:
    """Passes of a step list; a step `{include: NAME}` stands for every pass of recipe NAME, so a
    recipe that extends another (full-int8 extends transformer-w8a8) never copies its pass list."""
    passes: list[GraphPass] = []
    for spec in specs:
        if isinstance(spec, dict) and set(spec) == {"include"}:
            name = str(spec["include"])
            if Path(name).stem in including:
                raise OnnxqError(f"recipe '{name}' includes itself (through {' -> '.join(including)})")
            passes += load_recipe(name, _including=including)[1]
        else:
            passes.append(_step(spec))
    return passes


def _step(spec: Any) -> GraphPass:
    if isinstance(spec, GraphPass):
        return spec
    if isinstance(spec, str):
        return make_pass(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (name, options), = spec.items()
        if options is not None and not isinstance(options, dict):
            raise OnnxqError(f"recipe step '{name}': options must be a mapping, got {options!r}")
        return make_pass(name, options)
    raise OnnxqError(f"recipe step {spec!r}: write a pass name, or {{name: {{option: value}}}}")


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class PassRecord:
    name: str
    kind: str
    options: dict[str, Any]
    summary: dict[str, Any]
    seconds: float
    max_rel_change: float | None = None  # measured for exact passes


def run_pipeline(model: ir.Model, passes: list[GraphPass], ctx: PassContext, *, verify_exact: bool = True,
                 exact_tolerance: float = 1e-4, recipe_name: str = "") -> list[PassRecord]:
    """Run `passes` on `model` in place, checking after each; return (and record) what ran."""
    quantized = sorted({n.op_type for n in model.graph if n.op_type in _QUANTIZED_OPS})
    if quantized and not read_record(model):
        raise OnnxqError(f"the model already contains {', '.join(quantized)} nodes: give onnxq the floating-point model")
    strict, known_problem = input_problem(model)
    infer_shapes(model)
    quantize_step = next((p for p in passes if p.name == "quantize"), None)
    if quantize_step is not None:  # passes that prepare for quantization tune to its weight granularity
        ctx.notes.setdefault("weights", quantize_step.weights)
    probe = ctx.calibration.first() if (verify_exact and ctx.calibration is not None) else None
    reference = _outputs(model, probe) if probe is not None else None
    records = []
    for graph_pass in progress(passes, desc="passes", unit="pass", disable=not ctx.show_progress):
        start = time.perf_counter()
        summary = graph_pass.apply(model, ctx) or {}
        RemoveUnusedNodesPass()(model)  # passes leave replaced constants behind; drop them here, once
        name_anonymous(model.graph)
        check_model(model, strict=strict, what=f"after pass '{graph_pass.name}'", tolerate=known_problem)
        infer_shapes(model)
        record = PassRecord(graph_pass.name, graph_pass.kind.value, graph_pass.options(), summary,
                            round(time.perf_counter() - start, 3))
        if reference is not None:
            outputs = _outputs(model, probe)
            if graph_pass.kind is Kind.EXACT:
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


def ir_version_for(model: ir.Model) -> int:
    """The IR version the output needs: 10 (node metadata, INT4) or what its opsets require.

    Writers like onnx.helper stamp the newest IR version, which runtimes often cannot read yet.
    """
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return max(10, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))


def _outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnxq.runtime.session import session  # deferred: ORT start-up is only paid when verifying

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


def write_record(model: ir.Model, records: list[PassRecord], recipe_name: str, target: str) -> None:
    """Store what ran in metadata_props: one JSON record plus one readable line per pass (Netron)."""
    props = model.metadata_props
    previous = json.loads(props.get("onnxq.passes", "[]"))
    start = len(previous)
    props["onnxq.version"] = __version__
    props["onnxq.recipe"] = recipe_name
    props["onnxq.target"] = target
    props["onnxq.passes"] = json.dumps(previous + [dataclasses.asdict(r) for r in records])
    for i, r in enumerate(records, start=start + 1):
        options = ", ".join(f"{k}={v}" for k, v in r.options.items())
        summary = ", ".join(f"{k}={v}" for k, v in r.summary.items() if not isinstance(v, (dict, list)))
        props[f"onnxq.pass.{i:02d}.{r.name}"] = f"[{r.kind}] {options}" + (f" | {summary}" if summary else "")


def read_record(model: ir.Model) -> list[dict[str, Any]]:
    return json.loads(model.metadata_props.get("onnxq.passes", "[]"))
