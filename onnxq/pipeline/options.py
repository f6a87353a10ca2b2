"""Pass options: typed dataclass fields with bounds, checked before a pass is built.

A pass's options are the fields of its frozen dataclass. `option(default, ...)` adds what the type
alone cannot say (a range, a set of choices); `validate` checks a recipe's values against the
annotations so `percentile: -5`, `bins: 0` or `bias_correction: "no"` stop with a message naming the
pass and the option instead of running with a silently wrong value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from onnxq.errors import OnnxqError

_NO_DEFAULT = dataclasses.MISSING


def option(default: Any = _NO_DEFAULT, *, low: float | None = None, high: float | None = None,
           above: float | None = None, choices: tuple | None = None, path: bool = False):
    """A dataclass field with bounds: low <= value <= high, value > above, value in choices (for a list,
    every item); path=True: a file name, read relative to the recipe that names it."""
    meta = {"low": low, "high": high, "above": above, "choices": choices, "path": path}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def validate(cls: type, options: dict[str, Any], pass_name: str) -> dict[str, Any]:
    """Check `options` against the fields of dataclass `cls`; return them with lists as lists."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise OnnxqError(f"pass '{pass_name}' has no option {unknown[0]!r} "
                         f"(its options: {', '.join(sorted(fields)) or 'none'})")
    checked = {}
    for name, value in options.items():
        where = f"pass '{pass_name}', option '{name}'"
        checked[name] = _check_type(value, hints[name], where)
        _check_bounds(checked[name], fields[name].metadata, where)
    return checked


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in args:
            try:
                return _check_type(value, arm, where)
            except OnnxqError as exc:
                errors.append(str(exc))
        raise OnnxqError(f"{where}: {value!r} is not {' or '.join(_describe(a) for a in args)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
        raise OnnxqError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [_check_type(v, item, where) for v in value]
            return items if origin is list else tuple(items)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    raise OnnxqError(f"{where}: {value!r} is not {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def _check_bounds(value: Any, meta, where: str) -> None:
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    low, high, above, choices = (meta.get(k) for k in ("low", "high", "above", "choices"))
    every = "every value" if isinstance(value, (list, tuple)) else "the value"
    for item in items:
        if low is not None and item < low:
            raise OnnxqError(f"{where}: {value!r} is below its minimum {low} ({every} must be at least {low})")
        if high is not None and item > high:
            raise OnnxqError(f"{where}: {value!r} is above its maximum {high} ({every} must be at most {high})")
        if above is not None and item <= above:
            raise OnnxqError(f"{where}: {value!r}: {every} must be greater than {above}")
        if choices is not None and item not in choices:
            raise OnnxqError(f"{where}: {item!r} is not one of {', '.join(map(repr, choices))}")
