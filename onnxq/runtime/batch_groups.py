"""Several calibration batches in one ONNX Runtime run, their outputs handed back batch by batch.

Calibration sets of sentence encoders come as many batches of one sentence; each run then costs ORT's
per-run overhead and thin matrix products several times over. `grouped_runs` concatenates consecutive
batches whose inputs have the same shapes along axis 0, runs them once, and splits every fetched tensor
back into the batches' own pieces, so whoever reads them sees exactly the batches it would have seen.

Splitting assumes what ORT does not promise: that a fetched tensor either stacks the batches along
axis 0 (an activation, a flattened (batch·sequence, features) matrix) or does not depend on the batch
(a rotary table). It is checked, not assumed: the first two batches run alone and together, and
grouping is used only if every tensor of the joint run is the two single runs' tensors stacked, or
equal to both. Anything else (a tensor laid out sequence-first, a data-dependent shape, a graph input
with a fixed batch size) keeps one run per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

Feed = Mapping[str, np.ndarray]

GROUP_BYTES = 64 << 20  # fetched bytes one joint run may return
MAX_GROUP = 32  # batches in one joint run


def grouped_runs(run, names: Sequence[str], batches: Iterable[Feed]) -> Iterator[tuple[Feed, list[np.ndarray]]]:
    """(feed, outputs) per batch, in order, as `run(names, feed)` would give them one by one, but
    running consecutive batches of equal input shapes together where the check above allows it."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    second = next(batches, None)
    single = [run(names, dict(first))]
    yield first, single[0]
    if second is None:
        return
    single.append(run(names, dict(second)))
    yield second, single[1]
    try:
        kinds = _split_kinds([first, second], single, run(names, _joined([first, second])))
    except Exception:  # shapes that do not join, or a graph that takes one batch size only
        kinds = None
    if kinds is None:
        for feed in batches:
            yield feed, run(names, dict(feed))
        return
    per_batch = max(sum(x.nbytes for x in single[0]), 1)
    limit = max(1, min(MAX_GROUP, GROUP_BYTES // per_batch))
    group: list[Feed] = []
    for feed in batches:
        if group and (len(group) == limit or not _same_shapes(group[0], feed)):
            yield from _run_group(run, names, group, kinds)
            group = []
        group.append(feed)
    if group:
        yield from _run_group(run, names, group, kinds)


def _run_group(run, names, group: list[Feed], kinds: list[str]) -> Iterator[tuple[Feed, list[np.ndarray]]]:
    if len(group) == 1:
        yield group[0], run(names, dict(group[0]))
        return
    try:
        joint = run(names, _joined(group))
    except Exception:
        yield from ((feed, run(names, dict(feed))) for feed in group)
        return
    sizes = [len(next(iter(feed.values()))) for feed in group]
    pieces = []
    for x, kind in zip(joint, kinds):
        if kind == "shared":
            pieces.append([x] * len(group))
            continue
        unit, rest = divmod(len(x), sum(sizes))
        if rest or unit == 0:  # a data-dependent length: this group runs batch by batch
            yield from ((feed, run(names, dict(feed))) for feed in group)
            return
        pieces.append(np.split(x, np.cumsum([unit * s for s in sizes])[:-1]))
    for i, feed in enumerate(group):
        yield feed, [p[i] for p in pieces]


def _split_kinds(feeds: list[Feed], single: list[list[np.ndarray]], joint: list[np.ndarray]) -> list[str] | None:
    """Per fetched tensor, "stacked" or "shared" if the joint run of `feeds` is what their single runs
    give; None if any tensor is neither (grouping is then not used)."""
    kinds = []
    for a, b, j in zip(single[0], single[1], joint):
        if a.shape == b.shape == j.shape and _close(j, a) and _close(j, b):
            kinds.append("shared")
        elif j.shape[:1] == (len(a) + len(b),) and a.shape[1:] == b.shape[1:] == j.shape[1:] and len(a) == len(b) \
                and _close(j, np.concatenate([a, b])):
            kinds.append("stacked")
        else:
            return None
    return kinds


def _close(x: np.ndarray, y: np.ndarray) -> bool:
    """Equal up to the summation-order differences of a larger matrix product."""
    if x.dtype.kind not in "fc":
        return bool(np.array_equal(x, y))
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    return bool(np.allclose(x, y, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))


def _same_shapes(a: Feed, b: Feed) -> bool:
    return a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) for k in a)


def _joined(feeds: list[Feed]) -> dict[str, np.ndarray]:
    if not all(_same_shapes(feeds[0], f) for f in feeds[1:]) or any(np.ndim(v) == 0 for v in feeds[0].values()):
        raise _NotJoinable
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


class _NotJoinable(Exception):
    pass
