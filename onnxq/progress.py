"""Progress bars for long work (calibration, reconstruction), quiet when output is not a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False):
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty())
