"""One run of the calibration data through ONNX Runtime, serving every statistic asked of a model state.

Passes register observers (onnxq.stats.observers, or their own) on a StatisticsService for the model
as it stands; `run` exposes the union of the tensors they read as extra graph outputs, feeds the
calibration batches once, and hands each observer its tensors batch by batch. Nothing is kept
between batches but what the observers accumulate, so memory holds one batch's activations (or those
of a few small batches that ORT runs together, onnxq.runtime.batch_groups; observers still see them
one batch at a time).

A large model runs in segments (onnxq.runtime.segments): segment after segment over all batches, so
memory holds one segment's session and the tensors crossing one cut, whatever the depth. A tensorwise
observer (one statistic per tensor) gets each tensor as soon as its segment has run; any other is
updated once the last segment producing one of its tensors has run, its tensors from earlier segments
waiting for that, per batch.

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
from onnxq.runtime.batch_groups import DATA_DEPENDENT, grouped_runs
from onnxq.runtime.segments import Resume, SegmentedModel, worth_segmenting
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
    tensors observed here) serves this pass too, sparing ORT a second start. `segment_threshold`:
    models with more weight bytes than this run in segments of `segment_budget` bytes (defaults: those
    of onnxq.runtime.segments). `resume`: see SegmentedModel.runs; a caller that runs the same model state
    several times for tensors further and further into it passes the same Resume to each service."""

    def __init__(self, model: ir.Model, data: Iterable[Feed], *, show_progress: bool = True,
                 max_batches: int | None = None, padding_mask: str | None = None,
                 reuse: StatisticsService | None = None, segment_threshold: int | None = None,
                 segment_budget: int | None = None, resume: Resume | None = None):
        self.model = model
        self.data = data
        self.show_progress = show_progress
        self.max_batches = max_batches
        self.padding_mask = padding_mask if padding_mask is not None else getattr(data, "padding_mask", None)
        self.observers: list[Observer] = []
        self._done = False
        self._session = reuse._session if reuse is not None else None
        self._exposed: set[str] = reuse._exposed if reuse is not None else set()
        self.segment_threshold, self.segment_budget, self.resume = segment_threshold, segment_budget, resume

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
        if worth_segmenting(self.model, self.segment_threshold):
            try:
                segmented = SegmentedModel(self.model, names, budget_bytes=self.segment_budget)
            except ValueError:  # a crossing tensor without a known type: the whole graph serves instead
                segmented = None
            if segmented is not None:
                self._run_segmented(segmented, names, desc)
                return
        if self._session is None or not self._exposed.issuperset(names):
            self._session, self._exposed = session(exposing(self.model, names)), set(names)
        sess = self._session
        batches = iter(self.data)
        total = len(self.data) if hasattr(self.data, "__len__") else None
        if self.max_batches is not None:
            batches = itertools.islice(batches, self.max_batches)
            total = self.max_batches if total is None else min(total, self.max_batches)

        def run(fetch, feed):
            try:
                return sess.run(fetch, feed)
            except Exception as exc:  # ORT raises its own exception types for bad feeds
                raise OnnxqError(f"ONNX Runtime failed on a batch: {str(exc).splitlines()[0]}") from None

        groupable = not any(node.op_type in DATA_DEPENDENT for node in self.model.graph)
        for feed, outputs in progress(grouped_runs(run, names, batches, allowed=groupable), desc=desc, total=total,
                                      unit="batch", disable=not self.show_progress):
            mask = feed.get(self.padding_mask) if self.padding_mask else None
            if mask is not None and not mask.all():
                keep = mask.astype(bool)
                outputs = [real_rows(x, keep) for x in outputs]
            values = dict(zip(names, outputs))
            for obs in self.observers:
                obs.update({n: values[n] for n in obs.names})

    def _run_segmented(self, model: SegmentedModel, names: list[str], desc: str) -> None:
        batches = list(itertools.islice(iter(self.data), self.max_batches))
        stage = {n: model.stage_of(n) for n in names}
        # a unit of an observer (all its tensors; one tensor of a tensorwise one) is served once the last
        # segment producing one of them has run; its tensors from earlier segments wait for that
        served_at: dict[int, dict[int, list[str]]] = {}  # stage -> observer index -> names
        release_at: dict[str, int] = {}  # when the last unit reading a tensor has been served
        for i, obs in enumerate(self.observers):
            for unit in _units(obs):
                k = max(stage[n] for n in unit)
                served_at.setdefault(k, {}).setdefault(i, []).extend(unit)
                for n in unit:
                    release_at[n] = max(release_at.get(n, -1), k)
        held: list[dict[str, np.ndarray]] = [{} for _ in batches]
        start, last = model.span(self.resume, len(batches))
        steps = progress(model.runs(batches, resume=self.resume), desc=desc, unit="batch", disable=not self.show_progress,
                         total=len(batches) * (last + 1 - start + any(k == -1 for k in stage.values())))
        for k, b, values in steps:
            mask = batches[b].get(self.padding_mask) if self.padding_mask else None
            if mask is not None and not mask.all():
                values = {n: real_rows(x, mask.astype(bool)) for n, x in values.items()}
            held[b].update((n, x) for n, x in values.items() if release_at[n] > k)
            for i, unit in served_at.get(k, {}).items():
                self.observers[i].update({n: values[n] if n in values else held[b][n] for n in dict.fromkeys(unit)})
            if held[b]:
                held[b] = {n: x for n, x in held[b].items() if release_at[n] > k}


def _units(observer: Observer) -> list[list[str]]:
    """The groups of tensors `observer` takes together: per tensor (or its `units()`) for a tensorwise
    one, all of them for any other."""
    if not getattr(observer, "tensorwise", False):
        return [list(observer.names)]
    return observer.units() if hasattr(observer, "units") else [[n] for n in observer.names]


def observe(model: ir.Model, data: Iterable[Feed], *observers: Observer, desc: str, show_progress: bool = True,
            max_batches: int | None = None, resume: Resume | None = None) -> None:
    """Serve `observers` by one pass of `data` through `model` (a StatisticsService in one call)."""
    service = StatisticsService(model, data, show_progress=show_progress, max_batches=max_batches, resume=resume)
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
