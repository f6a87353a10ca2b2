"""Plain-text tables for terminal output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """Left-aligned text columns, numbers right-aligned, with a rule under the header."""
    cells = [[clean(_fmt(c)) for c in row] for row in rows]
    headers = [clean(str(h)) for h in headers]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [clean(title)] if title else []
    out += [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4f}".rstrip("0").rstrip(".") if abs(x) < 1e3 else f"{x:.1f}"
        return f"{x:.3e}"
    return str(x)


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """`text` safe for a terminal: control and format characters (escape sequences, carriage returns,
    bidirectional overrides) from model names or metadata are shown escaped, e.g. \\x1b, never sent."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") or c == " "
                   else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
