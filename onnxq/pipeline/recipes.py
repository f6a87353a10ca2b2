"""Recipes: named lists of passes with options (a YAML/JSON file, a built-in name, or a Python list).

A step is a pass name, `{name: {option: value}}`, or `{include: RECIPE}` which stands for every
pass of another recipe; `{include: RECIPE, override: {pass: {option: value}}}` changes options of
the included passes, so a recipe that differs from another in a few options never copies it.
Options that name files (declared with `option(..., path=True)`) are read relative to the folder
of the recipe that names them, so built-in recipes find their data wherever onnxq is installed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from onnxq.errors import OnnxqError
from onnxq.pipeline.options import validate
from onnxq.pipeline.passes import GraphPass
from onnxq.pipeline.registry import pass_class

RECIPE_DIR = Path(__file__).parents[1] / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def make_pass(name: str, options: dict[str, Any] | None = None, *, base_dir: Path | None = None) -> GraphPass:
    """Pass `name` with `options` checked against its typed fields; relative paths from `base_dir`."""
    cls = pass_class(name)
    checked = validate(cls, dict(options or {}), name)
    for f in dataclasses.fields(cls):
        value = checked.get(f.name)
        if f.metadata.get("path") and isinstance(value, str) and base_dir is not None and not Path(value).is_absolute():
            checked[f.name] = str(base_dir / value)
    try:
        return cls(**checked)
    except (TypeError, ValueError) as exc:
        raise OnnxqError(f"pass '{name}': bad options ({exc})") from None


def with_options(graph_pass: GraphPass, **changes: Any) -> GraphPass:
    """A copy of `graph_pass` with some options changed (validated like a recipe's)."""
    checked = validate(type(graph_pass), changes, graph_pass.name)
    try:
        return dataclasses.replace(graph_pass, **checked)
    except (TypeError, ValueError) as exc:
        raise OnnxqError(f"pass '{graph_pass.name}': bad options ({exc})") from None


def load_recipe(recipe: str | Path | list | None, *, default: str = "default",
                _including: tuple[str, ...] = ()) -> tuple[str, list[GraphPass]]:
    """Resolve `recipe` (file, built-in name, list of steps, or None for `default`) into passes.
    `_including`: the recipes whose `include` steps led here (to stop include cycles)."""
    if recipe is None:
        recipe = default
    if isinstance(recipe, (list, tuple)):
        if not recipe:
            raise OnnxqError("recipe: the list of steps is empty (name at least the quantize step)")
        return "<python>", _steps(list(recipe), _including, None)
    if not isinstance(recipe, (str, Path)):
        raise OnnxqError(f"recipe must be a name, a file path or a list of steps, not {type(recipe).__name__}")
    path = _recipe_path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise OnnxqError(f"{path}: cannot read recipe ({str(exc).splitlines()[0]})") from None
    steps = spec.get("passes") if isinstance(spec, dict) else spec
    if not isinstance(steps, list) or not steps:
        raise OnnxqError(f"{path}: a recipe needs a non-empty list under 'passes'")
    return path.stem, _steps(steps, _including + (path.stem,), path.parent)


def _recipe_path(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = RECIPE_DIR / f"{recipe}.yaml"
    if str(recipe) in builtin_recipes():
        return builtin
    raise OnnxqError(f"recipe '{recipe}' is neither a file nor a built-in recipe (built-in: {', '.join(builtin_recipes())})")


def _steps(specs: list, including: tuple[str, ...], base_dir: Path | None) -> list[GraphPass]:
    passes: list[GraphPass] = []
    for spec in specs:
        if isinstance(spec, dict) and "include" in spec:
            passes += _include(spec, including)
        else:
            passes.append(_step(spec, base_dir))
    return passes


def _include(spec: dict, including: tuple[str, ...]) -> list[GraphPass]:
    unknown = sorted(set(spec) - {"include", "override"})
    if unknown:
        raise OnnxqError(f"recipe step {spec!r}: an include step takes 'include' and 'override', not {unknown[0]!r}")
    name = str(spec["include"])
    if Path(name).stem in including:
        raise OnnxqError(f"recipe '{name}' includes itself (through {' -> '.join(including)})")
    passes = load_recipe(name, _including=including)[1]
    overrides = spec.get("override") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise OnnxqError(f"include '{name}': override must map pass names to {{option: value}}")
    for pass_name, changes in overrides.items():
        hits = [i for i, p in enumerate(passes) if p.name == pass_name]
        if not hits:
            raise OnnxqError(f"include '{name}': override names pass '{pass_name}', which that recipe does not run")
        for i in hits:
            passes[i] = with_options(passes[i], **changes)
    return passes


def _step(spec: Any, base_dir: Path | None) -> GraphPass:
    if isinstance(spec, GraphPass):
        return spec
    if isinstance(spec, str):
        return make_pass(spec, base_dir=base_dir)
    if isinstance(spec, dict) and len(spec) == 1:
        (name, options), = spec.items()
        if options is not None and not isinstance(options, dict):
            raise OnnxqError(f"recipe step '{name}': options must be a mapping, got {options!r}")
        return make_pass(str(name), options, base_dir=base_dir)
    raise OnnxqError(f"recipe step {spec!r}: write a pass name, or {{name: {{option: value}}}}")
