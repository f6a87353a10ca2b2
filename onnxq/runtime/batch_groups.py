"""Several calibration batches in one ONNX Runtime run, their outputs handed back batch by batch.

Calibration sets of sentence encoders come as many batches of one sentence; each run then costs ORT's
per-run overhead and thin matrix products several times over. `grouped_runs` concatenates consecutive
batches whose inputs have the same shapes along axis 0, runs them once, and splits every fetched tensor
back into the batches' own pieces, so whoever reads them sees exactly the batches it would have seen.

Splitting assumes what ORT does not promise: that a fetched tensor either stacks the batches along
axis 0 (an activation, a flattened (batch·sequence, features) matrix) or does not depend on the batch
(a rotary table). It is checked, not assumed: the first two batches run alone and together, and
grouping is used only if every tensor of the joint run is the two single runs' tensors stacked, or
equal to both. Anything else (a tensor laid out sequence-first, a graph input with a fixed batch
size, two equal first batches) keeps one run per batch, as do batches whose fetched tensors alone
take half of a joint run's byte budget (nothing to gain, and the check would cost two batches'
worth), and a graph with an op whose output length depends on the values (DATA_DEPENDENT), which
two batches cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

Feed = Mapping[str, np.ndarray]

GROUP_BYTES = 64 << 20  # fetched bytes one joint run may return
MAX_GROUP = 32  # batches in one joint run


# ops whose output length depends on the values (or whose bodies could couple samples): the check on
# two batches cannot vouch for later ones, so a graph holding one runs batch by batch
DATA_DEPENDENT = frozenset({"NonZero", "Compress", "Unique", "NonMaxSuppression", "TopK", "Loop", "If", "Scan"})


def grouped_runs(run, names: Sequence[str], batches: Iterable[Feed], *,
                 allowed: bool = True) -> Iterator[tuple[Feed, list[np.ndarray]]]:
    """(feed, outputs) per batch, in order, as `run(names, feed)` would give them one by one, but
    running consecutive batches of equal input shapes together where the check above allows it
    (`allowed`: False keeps one run per batch, for a graph with a DATA_DEPENDENT op)."""
    if not allowed:
        yield from ((feed, run(names, dict(feed))) for feed in batches)
        return
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
    kinds = None
    per_batch, fed = max(sum(x.nbytes for x in single[0]), 1), _fed_bytes(first)
    # batches that already fill a joint run's budget alone gain nothing: skip the check, which runs and
    # compares two batches' worth of every fetched tensor
    worth_it = GROUP_BYTES // per_batch >= 2
    if worth_it and not _same_values(first, second):  # two equal batches would pass any tensor
        try:
            kinds = _split_kinds([first, second], single, run(names, _joined([first, second])))
        except Exception:  # shapes that do not join, or a graph that takes one batch size only
            kinds = None
    if kinds is None:
        for feed in batches:
            yield feed, run(names, dict(feed))
        return
    group: list[Feed] = []
    limit = 1
    for feed in batches:
        if group and (len(group) >= limit or not _same_shapes(group[0], feed)):
            yield from _run_group(run, names, group, kinds)
            group = []
        if not group:  # fetched bytes taken to grow with the square of the feed (attention scores)
            estimate = per_batch * max(1.0, _fed_bytes(feed) / fed) ** 2
            limit = max(1, min(MAX_GROUP, int(GROUP_BYTES // estimate)))
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
    """Equal up to the summation-order differences of a larger matrix product. Mask-sized values
    (|v| ≥ 1e30, ±inf, NaN) must match exactly and do not set the tolerance."""
    if x.dtype.kind not in "fc":
        return bool(np.array_equal(x, y))
    huge_x, huge_y = ~(np.abs(x) < 1e30), ~(np.abs(y) < 1e30)
    if not np.array_equal(huge_x, huge_y) or not np.array_equal(x[huge_x], y[huge_y], equal_nan=True):
        return False
    rest_x, rest_y = x[~huge_x], y[~huge_y]
    scale = float(np.max(np.abs(rest_y))) if rest_y.size else 0.0
    return bool(np.allclose(rest_x, rest_y, rtol=1e-4, atol=1e-5 * scale))


def _same_values(a: Feed, b: Feed) -> bool:
    return _same_shapes(a, b) and all(np.array_equal(a[k], b[k]) for k in a)


def _fed_bytes(feed: Feed) -> int:
    return max(sum(np.asarray(v).nbytes for v in feed.values()), 1)


def _same_shapes(a: Feed, b: Feed) -> bool:
    return a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) for k in a)


def _joined(feeds: list[Feed]) -> dict[str, np.ndarray]:
    if not all(_same_shapes(feeds[0], f) for f in feeds[1:]) or any(np.ndim(v) == 0 for v in feeds[0].values()):
        raise _NotJoinable
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


class _NotJoinable(Exception):
    pass
