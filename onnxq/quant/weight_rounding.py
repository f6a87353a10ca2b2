"""Integer weights for every quantized weight of a model, several weights at a time.

Each weight's scale search (onnxq.quant.qdq.quantize_weight) and GPTQ rounding (onnxq.quant.gptq) depends
on that weight and its own Hessian only, and both spend their time in numpy and torch calls that release
the GIL, so a small thread pool keeps the cores busy that one Python loop over columns would leave idle.
The results are those of rounding the weights one by one, returned in the order given; weights are read
and Hessians popped (HessianStore.pop may run a calibration pass) on the caller's thread, and at most
`workers` weights are in flight, so memory holds no more Hessians than that beyond the store's own.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from onnxq.quant import gptq
from onnxq.quant.qdq import Format, quantize_weight, scale_per_element

MAX_WORKERS = 4  # a chosen bound: each weight in flight holds float64 copies of itself and its Hessian

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class WeightJob:
    """One weight to round: its float array, layout (channel axis, block size) and, for GPTQ, its
    Hessian and a reader node (which fixes the weight's in/out orientation)."""

    name: str
    array: np.ndarray
    axis: int | None
    block: int
    hessian: object = None
    reader: object = None
    fmt: Format | None = None  # this weight's own format (mixed precision); the call's format otherwise


def round_weights(jobs: Iterable[WeightJob], fmt: Format, calibrator: str, dampings: tuple[float, ...],
                  workers: int | None = None, order: str = "activation") -> Iterator[tuple[WeightJob, np.ndarray, np.ndarray]]:
    """(job, integers, scale) per job, in the jobs' order: scales from `calibrator`, integers GPTQ-rounded
    (inputs in `order`, see gptq.gptq_round) where the job has a Hessian, rounded to nearest otherwise."""

    def round_one(job: WeightJob):
        own = job.fmt or fmt
        # blocks' clips weighted by what each input's error costs the output (diag H)
        importance = gptq.input_square_sums(job.hessian) if job.block and job.hessian is not None else None
        q, scale = quantize_weight(job.array, job.axis, own, calibrator, job.block, importance)
        if job.hessian is not None:
            q = gptq.gptq_round(job.array, scale_per_element(scale, job.array.shape, job.axis, job.block),
                                job.hessian, own, job.reader, dampings, order)
        return job, q, scale

    return in_order(round_one, jobs, workers or min(MAX_WORKERS, os.cpu_count() or 1))


def in_order(fn: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """map(fn, items) with up to `workers` calls running at once; `items` is drawn lazily on this thread,
    one ahead of the results handed back."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxq-weights") as pool:
        running: deque = deque()
        try:
            for item in items:
                running.append(pool.submit(fn, item))
                if len(running) >= workers:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:  # an error or an abandoned iteration: nothing queued starts
            for future in running:
                future.cancel()
