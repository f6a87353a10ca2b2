"""Which pass is running: for the scripts that count ORT runs and time quantize per pass."""

from __future__ import annotations

import sys


def pass_on_stack() -> str:
    """The name of the graph pass whose `apply` called the caller's caller, or "(pipeline)"."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "apply" and hasattr(owner, "name") and "/passes/" in frame.f_code.co_filename:
            return owner.name
        frame = frame.f_back
    return "(pipeline)"
