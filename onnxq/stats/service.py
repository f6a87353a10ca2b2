"""One run of the calibration data through ONNX Runtime, serving every statistic asked of a model state.

Passes register observers (onnxq.stats.observers, or their own) on a StatisticsService for the model
as it stands; `run` exposes the union of the tensors they read as extra graph outputs, feeds the
calibration batches once, and hands each observer its tensors batch by batch. Nothing is kept
between batches but what the observers accumulate, so memory holds one batch's activations.

Padded positions are dropped for every observer: where the calibration set names a padding mask
(batch, sequence), each (batch, sequence, ...) tensor reaches the observers as its real rows only,
stacked as (rows, ...) (see real_rows). Tensors of other layouts arrive whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.progress import progress
from onnxq.runtime.session import exposing, session

Feed = Mapping[str, np.ndarray]


class Observer(Protocol):
    """Reads the tensors `names` of each calibration batch (padding dropped) and accumulates a statistic."""

    names: Sequence[str]

    def update(self, values: dict[str, np.ndarray]) -> None:
        ...


O = TypeVar("O", bound=Observer)


class StatisticsService:
    """The observers of one model state, served by a single pass over `data`.

    `data` is a CalibrationSet or any iterable of feeds (its `padding_mask` attribute, if any, names the
    input whose zeros mark padding); `max_batches` stops after that many batches (a trial on a few).
    `reuse`: a service that already ran on this same model state, whose session (exposing at least the
    tensors observed here) serves this pass too, sparing ORT a second start."""

    def __init__(self, model: ir.Model, data: Iterable[Feed], *, show_progress: bool = True,
                 max_batches: int | None = None, padding_mask: str | None = None,
                 reuse: StatisticsService | None = None):
        self.model = model
        self.data = data
        self.show_progress = show_progress
        self.max_batches = max_batches
        self.padding_mask = padding_mask if padding_mask is not None else getattr(data, "padding_mask", None)
        self.observers: list[Observer] = []
        self._done = False
        self._session = reuse._session if reuse is not None else None
        self._exposed: set[str] = reuse._exposed if reuse is not None else set()

    def register(self, observer: O) -> O:
        if self._done:
            raise RuntimeError("this model state's statistics were already collected: register before run()")
        self.observers.append(observer)
        return observer

    def run(self, desc: str) -> None:
        """Feed the calibration data once; every registered observer sees every batch."""
        if self._done:
            raise RuntimeError("StatisticsService.run() serves one pass; make a new service for a new model state")
        self._done = True
        names = list(dict.fromkeys(n for obs in self.observers for n in obs.names))
        if not names:
            return
        if self._session is None or not self._exposed.issuperset(names):
            self._session, self._exposed = session(exposing(self.model, names)), set(names)
        sess = self._session
        batches = iter(self.data)
        total = len(self.data) if hasattr(self.data, "__len__") else None
        if self.max_batches is not None:
            batches = itertools.islice(batches, self.max_batches)
            total = self.max_batches if total is None else min(total, self.max_batches)
        for feed in progress(batches, desc=desc, total=total, unit="batch", disable=not self.show_progress):
            try:
                outputs = sess.run(names, dict(feed))
            except Exception as exc:  # ORT raises its own exception types for bad feeds
                raise OnnxqError(f"ONNX Runtime failed on a batch: {str(exc).splitlines()[0]}") from None
            mask = feed.get(self.padding_mask) if self.padding_mask else None
            if mask is not None and not mask.all():
                keep = mask.astype(bool)
                outputs = [real_rows(x, keep) for x in outputs]
            values = dict(zip(names, outputs))
            for obs in self.observers:
                obs.update({n: values[n] for n in obs.names})


def observe(model: ir.Model, data: Iterable[Feed], *observers: Observer, desc: str, show_progress: bool = True,
            max_batches: int | None = None) -> None:
    """Serve `observers` by one pass of `data` through `model` (a StatisticsService in one call)."""
    service = StatisticsService(model, data, show_progress=show_progress, max_batches=max_batches)
    for obs in observers:
        service.register(obs)
    service.run(desc)


def real_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rows of a (batch, sequence, ...) tensor at the positions `mask` (batch, sequence) keeps,
    stacked as (kept, ...); any other layout is returned whole.

    Padded positions carry activations no output depends on (mean pooling and attention mask them
    out). Left in, they dilute the statistics: a padded sentence encoder's calibration set can be
    mostly padding, which pulls histogram percentiles far below what the real positions reach."""
    if x.ndim >= 2 and x.shape[:2] == mask.shape:
        return x[mask]
    return x
