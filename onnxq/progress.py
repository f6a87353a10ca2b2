"""Progress of long work (passes, calibration runs, per-layer loops), on stderr, in two forms.

In a terminal, a tqdm bar per loop (cleared when the loop ends, so no finished bar stays on screen).
Elsewhere (a pipe, a log file, CI, nohup), plain lines with the time since the run started:

    [  12.3s] quantize: weights 0/58 layer
    [  22.4s] quantize: weights 29/58 layer
    [  31.0s] quantize: weights 58/58 layer done (18.7s)

one when a loop starts, one when it ends, and one at most every PROGRESS_EVERY_S seconds between,
so a long step is never silent and a finished one never looks current. A loop that names its items
(`item_name`) prints each item as it starts instead (the passes of a recipe). `disable=True` prints
nothing. `session()` starts the clock and keeps log lines whole: `bar_safe(log)` clears the bars
while a line is printed, and library logging goes through tqdm.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PROGRESS_EVERY_S = 10.0  # longest silence between two lines of one loop when stderr is not a terminal

T = TypeVar("T")
_clock_start: float | None = None


def elapsed() -> float:
    """Seconds since the current session started (since the first progress line outside one)."""
    global _clock_start
    if _clock_start is None:
        _clock_start = time.perf_counter()
    return time.perf_counter() - _clock_start


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def session(enabled: bool = True) -> Iterator[None]:
    """One run: restart the clock of the progress lines; in a terminal, print log records above the bars
    (the root logger's stream handlers through tqdm, onnxq's own handlers with the bars cleared)."""
    global _clock_start
    _clock_start = time.perf_counter()
    if not (enabled and on_terminal()):
        yield
        return
    handlers = list(logging.getLogger("onnxq").handlers)
    try:
        for h in handlers:
            h.emit = bar_safe(h.emit)  # an attribute of this handler object only, for this session
        with logging_redirect_tqdm():
            yield
    finally:
        for h in handlers:
            del h.emit  # the class's emit again


def bar_safe(log: Callable[[T], None]) -> Callable[[T], None]:
    """`log` wrapped so that what it prints appears with the bars cleared and redrawn after it."""
    def write(message: T) -> None:
        with tqdm.external_write_mode():
            log(message)
    return write


def line(text: str) -> None:
    """One progress line on stderr, stamped with the session's elapsed time."""
    print(f"[{elapsed():7.1f}s] {text}", file=sys.stderr, flush=True)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             disable: bool = False, item_name: Callable[[T], str] | None = None) -> Iterable[T]:
    """`iterable`, reporting its progress as the module docstring says."""
    if disable:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if on_terminal():
        return _bar(iterable, desc, total, unit, item_name)
    return _lines(iterable, desc, total, unit, item_name)


def _bar(iterable, desc, total, unit, item_name):
    with tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True) as bar:
        for item in bar:
            if item_name is not None:
                bar.set_postfix_str(item_name(item))
            yield item


def _lines(iterable, desc, total, unit, item_name):
    of = f"/{total}" if total is not None else ""
    start = last = time.perf_counter()
    done = 0
    if item_name is None:
        line(f"{desc} 0{of} {unit}")
    for item in iterable:
        if item_name is not None:
            line(f"{desc} {done + 1}{of}: {item_name(item)}")
        yield item
        done += 1
        if item_name is None and time.perf_counter() - last >= PROGRESS_EVERY_S and done != total:
            line(f"{desc} {done}{of} {unit}")
            last = time.perf_counter()
    counted = f"{desc} {done}{of}" if item_name is not None else f"{desc} {done}{of} {unit}"
    line(f"{counted} done ({time.perf_counter() - start:.1f}s)")
