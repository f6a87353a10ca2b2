"""GPTQ rounding of weights: integer values chosen so the layer's output error is small, not each weight's.

Rounding to nearest minimises ‖W − Ŵ‖ weight by weight, but what matters is the layer's output over
its real inputs, ‖X·Ŵ − X·W‖² = tr((Ŵ − W)ᵀ·H·(Ŵ − W)) with H = XᵀX. GPTQ (Frantar et al., 2022)
rounds the input rows one at a time and spreads each row's rounding error over the rows not yet
rounded, in proportion to H⁻¹ (the optimal compensation for a quadratic loss), using the upper
Cholesky factor of H⁻¹ so the whole matrix costs one factorisation. The scales stay those the quantize
step chose (max or mse), so the deployed format is unchanged: only the integers differ.

X is each layer's input in the model as deployed: after the activation Q/DQ the quantize step has just
inserted, so the compensation also absorbs part of the input's rounding error. H is accumulated batch
by batch (a d_in × d_in matrix per distinct input; memory never holds the calibration set's activations),
through onnxq.stats.service like every other statistic, so padded positions are left out. The sums are
kept in float32 (half the memory of the d_in² matrices of every layer at once); each layer's rounding
works in float64, where the Cholesky factorisation needs it. Readers of one input share one matrix, and
the mapping collect_hessians returns holds the only reference: popping a weight's entry as it is
rounded frees each matrix once its last reader is done.
Handles MatMul with a 2-D weight, Gemm (transA = 0) and 2-D Conv with group = 1 (inputs unfolded into
patches, one row per output position); other readers keep round-to-nearest. Torch does the linear
algebra and is imported only when this rounding is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.quant.qdq import Format
from onnxq.runtime.segments import Resume
from onnxq.stats.calib_data import CalibrationSet
from onnxq.stats.service import observe

# fractions of mean(diag H) added to H's diagonal, tried per layer (gptq_round): 0.01 is the paper's; larger
# values pull the result towards round-to-nearest and keep GPTQ from fitting the noise of a small H
DAMPINGS = (0.01, 0.1, 1.0)
BLOCK = 128  # rows rounded per lazy update of the rest of the matrix
PENDING_ROWS = 512  # input rows gathered before they are added to H (one product instead of many thin ones)
THIN_ROWS = 64  # batches with fewer rows are gathered; larger ones are added at once (no buffer to hold)


def supported(node: ir.Node) -> bool:
    """Whether `node` is a weight reader whose input rows GPTQ can form."""
    attrs = node.attributes
    if node.op_type == "MatMul":
        return node.inputs[1].shape is not None and len(node.inputs[1].shape) == 2
    if node.op_type == "Gemm":
        return attrs.get_int("transA", 0) == 0
    if node.op_type == "Conv":
        shape = node.inputs[1].shape
        return attrs.get_int("group", 1) == 1 and shape is not None and len(shape) == 4
    return False


@dataclass
class SplitHessian:
    """H = Σ XᵀX over the even (`fit`) and the odd (`check`) calibration batches: a damping is chosen by
    fitting on one half and scoring on the other, then GPTQ runs on both."""
    fit: np.ndarray
    check: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.fit.astype(np.float64) + self.check


class HessianObserver:
    """Σ rowsᵀ·rows (float32) of each distinct reader input (input tensor and, for Conv, patch geometry),
    kept apart for even and odd batches (SplitHessian).

    `affinities` (AGQ, for mixture-of-experts layers) names, per reader node, a tensor of one weight per
    row (an expert's gate): that reader's H is Σ gₜ·xₜᵀxₜ, so the tokens routed to the expert count by
    their gate weight and the others not at all."""

    def __init__(self, readers: dict[str, list[ir.Node]], affinities: Mapping[str, str] | None = None):
        self.affinities = dict(affinities or {})
        self.sources = {_row_source(node, self.affinities): node for nodes in readers.values() for node in nodes}
        self.names = sorted({node.inputs[0].name for node in self.sources.values()}
                            | {source[-1] for source in self.sources if source[-1]})
        self.totals: dict[tuple, object] = {}  # (*source, parity) -> torch float32 matrix
        self.pending: dict[tuple, list] = {}  # (*source, parity) -> row blocks not yet added to the total
        self.seen: dict[tuple, int] = dict.fromkeys(self.sources, 0)  # batches each source has had

    tensorwise = True  # a batch's tensors may come in several calls (a model run in segments)

    def units(self) -> list[list[str]]:
        """The tensors one reader's H needs together: its input and, with AGQ, its gate."""
        return [list(unit) for unit in dict.fromkeys(
            tuple(n for n in (node.inputs[0].name, source[-1]) if n) for source, node in self.sources.items())]

    def update(self, values: dict[str, np.ndarray]) -> None:
        import torch

        for source, node in self.sources.items():
            if node.inputs[0].name not in values or (source[-1] and source[-1] not in values):
                continue  # this source's tensors come in another call for this batch
            x = torch.from_numpy(np.asarray(values[node.inputs[0].name], dtype=np.float32))
            rows = _input_rows(node, x, torch)
            if source[-1]:  # AGQ: row t weighted by the expert's gate g_t (rows·√g, so H sums g_t·x_tᵀx_t)
                gate = np.asarray(values[source[-1]], dtype=np.float32).reshape(-1)
                rows = rows * torch.from_numpy(np.sqrt(np.maximum(gate, 0.0)))[:, None]
            key = (*source, self.seen[source] % 2)
            self.seen[source] += 1
            if len(rows) >= THIN_ROWS and key not in self.pending:  # a batch of many rows: one product already
                self._add(key, rows)
                continue
            self.pending.setdefault(key, []).append(rows)
            if sum(len(r) for r in self.pending[key]) >= PENDING_ROWS:
                self._add_pending(key)

    def _add_pending(self, key: tuple) -> None:
        """One product for the rows of several batches: a batch of one sentence gives a rank-~20 update,
        which costs a whole pass over the d_in² matrix; gathered, the same sums cost a fraction."""
        import torch

        self._add(key, torch.cat(self.pending.pop(key)))

    def _add(self, key: tuple, rows) -> None:
        if key in self.totals:
            self.totals[key].addmm_(rows.T, rows)  # in place: no second matrix while adding
        else:
            self.totals[key] = rows.T @ rows

    def hessians(self, readers: dict[str, list[ir.Node]]) -> dict[str, SplitHessian]:
        """Per weight key, H over the inputs of that weight's reader nodes (readers of one input share it)."""
        for key in list(self.pending):
            self._add_pending(key)
        hessians = {}
        for key, nodes in readers.items():
            halves = []
            for half in (0, 1):
                parts = [self.totals.get((*_row_source(node, self.affinities), half)) for node in nodes]
                halves.append(None if parts[0] is None else sum(parts[1:], parts[0]).numpy())
            fit, check = halves
            hessians[key] = SplitHessian(fit, check if check is not None else np.zeros_like(fit))
        return hessians


HESSIAN_BUDGET_BYTES = 1 << 30  # matrices held at once; more inputs than fit are collected in further passes


def collect_hessians(model: ir.Model, readers: dict[str, list[ir.Node]], data: CalibrationSet, *,
                     show_progress: bool = True, budget_bytes: int = HESSIAN_BUDGET_BYTES,
                     affinities: Mapping[str, str] | None = None) -> HessianStore:
    """Per weight key, H (float32) over the inputs of that weight's reader nodes, split by batch parity,
    as a HessianStore: `pop(key)` as each weight is rounded. `affinities`: see HessianObserver."""
    return HessianStore(model, readers, data, show_progress=show_progress, budget_bytes=budget_bytes,
                        affinities=affinities)


class HessianStore:
    """GPTQ's H per weight key, collected group by group within a memory budget and freed as used.

    Readers of one input (Q/K/V, gate/up) share one matrix: memory grows with distinct inputs, not weights.
    Inputs are grouped in the readers' order, as many as fit `budget_bytes` (2·d_in² float32 each, for the
    two batch parities; a group always takes every key reading its inputs); a group's matrices are gathered
    by one calibration pass when its first key is popped, and each matrix is released when its last key has
    been popped. Every pass runs on a snapshot of the model as it was given (weights still float), whatever
    the caller has since inserted, so the matrices are those one pass over all inputs would give; the
    snapshot shares the model's weight arrays. A model whose matrices fit the budget takes one pass."""

    def __init__(self, model: ir.Model, readers: dict[str, list[ir.Node]], data: CalibrationSet, *,
                 show_progress: bool = True, budget_bytes: int = HESSIAN_BUDGET_BYTES,
                 affinities: Mapping[str, str] | None = None):
        self.readers = readers
        self.affinities = affinities
        self.data = data
        self.show_progress = show_progress
        self.groups = _groups(readers, budget_bytes, affinities or {})
        self.group_of = {key: i for i, keys in enumerate(self.groups) for key in keys}
        self.held: dict[str, SplitHessian] = {}
        self.collected: set[int] = set()
        self.snapshot = model.clone() if len(self.groups) > 1 else model  # shares the weight tensors
        self.passes = 0
        self.resume = Resume()  # a model run in segments: each group's pass starts where the last one stopped

    def __contains__(self, key: str) -> bool:
        return key in self.group_of

    def __len__(self) -> int:
        return len(self.group_of)

    def pop(self, key: str) -> SplitHessian:
        group = self.group_of.pop(key)
        if group not in self.collected:
            self._collect(group)
        return self.held.pop(key)

    def _collect(self, group: int) -> None:
        keys = self.groups[group]
        readers = {k: self.readers[k] for k in keys}
        observer = HessianObserver(readers, self.affinities)
        desc = "GPTQ statistics" if len(self.groups) == 1 else f"GPTQ statistics {group + 1}/{len(self.groups)}"
        observe(self.snapshot, self.data, observer, desc=desc, show_progress=self.show_progress, resume=self.resume)
        self.held.update(observer.hessians(readers))
        self.collected.add(group)
        self.passes += 1
        if len(self.collected) == len(self.groups):
            self.snapshot, self.resume = None, None


def _groups(readers: dict[str, list[ir.Node]], budget_bytes: int, affinities: Mapping[str, str]) -> list[list[str]]:
    """Weight keys in the readers' order, cut where the distinct inputs' matrices would pass the budget;
    keys that share an input (directly or through others) stay in one group."""
    def source(node: ir.Node) -> tuple:
        return _row_source(node, affinities)

    width = {source(node): _row_width(node) for nodes in readers.values() for node in nodes}
    parent: dict[str, str] = {}
    first_reader: dict[tuple, str] = {}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for key, nodes in readers.items():  # union-find: keys linked through a shared input
        parent.setdefault(key, key)
        for node in nodes:
            parent[root(key)] = root(first_reader.setdefault(source(node), key))
    units: dict[str, list[str]] = {}
    for key in readers:
        units.setdefault(root(key), []).append(key)
    groups: list[list[str]] = []
    size = 0
    for keys in units.values():
        extra = sum(2 * 4 * width[src] ** 2 for src in {source(n) for k in keys for n in readers[k]})
        if not groups or size + extra > budget_bytes:
            groups.append([])
            size = 0
        groups[-1] += keys
        size += extra
    return groups


def _row_width(node: ir.Node) -> int:
    """d_in: the length of the rows a reader's weight meets (its Hessian is d_in × d_in)."""
    shape = list(node.inputs[1].shape)
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 0):
        return int(shape[0])
    return int(np.prod(shape[1:]))


def _row_source(node: ir.Node, affinities: Mapping[str, str]) -> tuple:
    """What determines a reader's weighted input rows: the input tensor, for Conv the patch geometry, and
    the tensor weighting its rows ("" when unweighted)."""
    return (node.inputs[0].name, *(_conv_geometry(node) if node.op_type == "Conv" else ()),
            affinities.get(node.name, ""))


def _conv_geometry(node: ir.Node) -> tuple[tuple, tuple, tuple, tuple]:
    """(kernel, pads, strides, dilations) of a 2-D Conv."""
    attrs = node.attributes
    return (tuple(node.inputs[1].shape[2:]), tuple(attrs.get_ints("pads", [0, 0, 0, 0])),
            tuple(attrs.get_ints("strides", [1, 1])), tuple(attrs.get_ints("dilations", [1, 1])))


def _input_rows(node: ir.Node, x, torch):
    """The layer input as a matrix whose rows each meet the weight as one vector (d_in columns)."""
    if node.op_type == "Conv":
        kernel, pads, strides, dilations = _conv_geometry(node)
        if pads[0] != pads[2] or pads[1] != pads[3]:  # unfold pads symmetrically; pad by hand otherwise
            x = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = (0, 0, 0, 0)
        patches = torch.nn.functional.unfold(x, kernel, dilation=dilations, padding=pads[:2], stride=strides)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·positions, C·kh·kw)
    return x.reshape(-1, x.shape[-1])


ROW_BLOCK = 8192  # output channels rounded at a time: GPTQ's rows are independent under one H


def gptq_round(weight: np.ndarray, scale: np.ndarray, hessian: np.ndarray | SplitHessian, fmt: Format,
               node: ir.Node, dampings: tuple[float, ...] = DAMPINGS, order: str = "activation") -> np.ndarray:
    """Integer weights (weight's layout and the format's dtype), GPTQ-rounded; `scale` has the weight's
    shape (each weight's own step: per tensor, per channel and per block alike). `order`: "activation"
    rounds the inputs from the largest Σx² (diag H) down (GPTQ's act-order), "natural" in index order.

    With a SplitHessian whose halves both hold rows, each damping is fitted on one half and scored on the
    other next to round-to-nearest, and the winner runs on all rows: where calibration rows barely outnumber
    the inputs, a light damping fits H's noise while a heavy one gives away GPTQ's gain on large sets, so
    no single damping suits every layer. Otherwise the lightest.

    Output channels are independent under one H (each row's errors propagate along its own inputs), and
    the output error is a sum over them, so rows go ROW_BLOCK at a time: an LM head's float64 working
    copies are those of one block, not of 49152 rows."""
    import torch

    w_oi, restore = _as_out_by_in(weight, node)
    s_oi = _as_out_by_in(_float64_broadcast(scale, weight.shape, torch), node)[0]
    permutation, restore = _activation_order(hessian, restore) if order == "activation" else (None, restore)
    if permutation is not None:
        hessian = _permuted(hessian, permutation)

    def blocks():
        for start in range(0, w_oi.shape[0], ROW_BLOCK):
            w = np.array(w_oi[start:start + ROW_BLOCK], dtype=np.float64)
            s = s_oi[start:start + ROW_BLOCK]
            if permutation is not None:
                w, s = w[:, permutation], s[:, permutation]
            w = torch.from_numpy(w)
            yield w, s, torch.from_numpy(fmt.to_grid((w / s).numpy()))

    def nearest_only() -> np.ndarray:
        return restore(np.concatenate([nearest.numpy() for _, _, nearest in blocks()])).astype(fmt.numpy)

    if isinstance(hessian, SplitHessian) and np.any(hessian.check):
        fit, check = (torch.tensor(np.asarray(h, dtype=np.float64)) for h in (hessian.fit, hessian.check))
        factors = {d: _inverse_factor(fit, d) for d in dampings}
        held_out, nearest_error = dict.fromkeys(dampings, 0.0), 0.0
        for w, s, nearest in blocks():
            nearest_error += _output_error(w, nearest * s, check)
            for d, u in factors.items():
                held_out[d] += _output_error(w, _gptq(w, s, u, fmt) * s, check)
        damping = min(held_out, key=held_out.get)
        if nearest_error <= held_out[damping]:
            return nearest_only()
        h = fit + check
    else:
        h = torch.tensor(np.array(hessian.total if isinstance(hessian, SplitHessian) else hessian, dtype=np.float64))
        damping = min(dampings)
    u = _inverse_factor(h, damping)
    gptq_parts, nearest_parts, gptq_error, nearest_error = [], [], 0.0, 0.0
    for w, s, nearest in blocks():
        q = _gptq(w, s, u, fmt)
        gptq_error += _output_error(w, q * s, h)
        nearest_error += _output_error(w, nearest * s, h)
        gptq_parts.append(q.numpy().astype(fmt.numpy))
        nearest_parts.append(nearest.numpy().astype(fmt.numpy))
    # GPTQ's updates assume small rounding errors; where scales clip hard (mse, per tensor) the pushed-on
    # clip errors can end worse than plain rounding under GPTQ's own objective. Keep the better.
    return restore(np.concatenate(nearest_parts if nearest_error < gptq_error else gptq_parts))


def input_square_sums(hessian: np.ndarray | SplitHessian) -> np.ndarray:
    """diag H (Σ x_i² per input over the calibration rows, float64): what an error in input i's weights
    costs the layer's output when inputs are uncorrelated. Read from the diagonals only: no d_in² temporary."""
    if isinstance(hessian, SplitHessian):
        return np.diag(hessian.fit).astype(np.float64) + np.diag(hessian.check)
    return np.diag(np.asarray(hessian)).astype(np.float64)


def _activation_order(hessian, restore):
    """GPTQ's activation order: inputs rounded from the largest Σx² (diag H) down, so the inputs
    whose errors cost most are rounded while every other input can still absorb their error. The scales
    are fixed before GPTQ runs (per block too), so the order changes which integers are chosen, not the
    format. Returns (permutation, `restore` composed with the inverse permutation)."""
    order = np.argsort(-input_square_sums(hessian), kind="stable")
    inverse = np.argsort(order)
    return order, lambda m: restore(m[:, inverse])


def _permuted(hessian, order):
    if isinstance(hessian, SplitHessian):
        return SplitHessian(*(np.asarray(h)[np.ix_(order, order)] for h in (hessian.fit, hessian.check)))
    return np.asarray(hessian)[np.ix_(order, order)]


def _float64_broadcast(scale: np.ndarray, shape: tuple, torch):
    """`scale` as a float64 tensor broadcast to `shape` without materialising repeated entries (per-channel
    and per-tensor scales stay one value per channel: a weight-sized float64 copy less for a wide LM head)."""
    scale = np.broadcast_to(scale, shape)
    distinct = scale[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in scale.strides)]
    return torch.from_numpy(np.array(distinct, dtype=np.float64)).expand(shape)


def _inverse_factor(h, damping: float):
    """The upper Cholesky factor of (H + damping·mean(diag H)·I)⁻¹, inputs that were never non-zero
    (nothing to compensate with) given a unit diagonal first."""
    import torch

    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    # With P the order-reversing permutation and PHP = LLᵀ, U = P·L⁻¹·P is upper triangular and
    # UᵀU = H⁻¹: one factorisation and one triangular inverse instead of two and a full inverse.
    lower = torch.linalg.cholesky(torch.flip(h, (0, 1)))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))


def _gptq(w, s, u, fmt: Format):
    """GPTQ's integers (out × in) for weights w at steps s, `u` the factor _inverse_factor gives."""
    import torch

    # The column loop runs in numpy on in × out copies, so that one input's column of W is a contiguous
    # row, with preallocated buffers: per-column vectors are small, and a torch call on them costs far
    # more in dispatch and thread hand-off than the arithmetic, while strided columns and a fresh
    # temporary per column made the loop memory-bound. The element-wise operations and the block
    # product are the same IEEE ones as on the out × in layout, so the integers are unchanged.
    w_t, s_t, u_np = w.numpy().T.copy(), np.ascontiguousarray(s.numpy().T), u.numpy()
    n, rows = w_t.shape
    q_t = np.empty_like(w_t)
    errors_t, scratch = np.empty((BLOCK, rows), dtype=w_t.dtype), np.empty((BLOCK, rows), dtype=w_t.dtype)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        for i in range(start, stop):
            fmt.to_grid(w_t[i] / s_t[i], out=q_t[i])
            err = errors_t[i - start]
            np.divide(w_t[i] - q_t[i] * s_t[i], u_np[i, i], out=err)
            np.multiply(u_np[i, i:stop, None], err[None, :], out=scratch[:stop - i])
            w_t[i:stop] -= scratch[:stop - i]
        if stop < n:
            errors = torch.from_numpy(np.ascontiguousarray(errors_t[:stop - start].T))
            w_t[stop:] -= (errors @ u[start:stop, stop:]).numpy().T
    q = torch.from_numpy(np.ascontiguousarray(q_t.T))
    return q


def _output_error(w, w_hat, h) -> float:
    """Σ over calibration rows of ‖x·(W − Ŵ)ᵀ‖², from H = Σ xᵀx (out × in weights)."""
    e = w - w_hat
    return float(((e @ h) * e).sum())


def _as_out_by_in(weight: np.ndarray, node: ir.Node):
    """(weight as an out × in matrix, function mapping such a matrix back to the weight's layout)."""
    if node.op_type == "MatMul":  # y = x·W, W is in × out
        return weight.T, lambda m: m.T
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 0:
        return weight.T, lambda m: m.T
    shape = weight.shape  # Gemm transB = 1 (out × in) or Conv (out × C × kh × kw, unfold's order)
    return weight.reshape(shape[0], -1), lambda m: m.reshape(shape)
