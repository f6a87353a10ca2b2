"""RWKVQuant's weight policy for RWKV models: scalar or vector quantization per tensor, and the VQ codebooks.

RWKVQuant (Xu et al., ICML 2025) observes that no single scheme suits every RWKV weight: uniform (scalar)
grids lose little on weights whose values are spread evenly, while clustered or heavy-tailed weights are
served far better by a codebook (vector quantization). It decides per tensor with a two-level proxy
computed from the sorted weight values alone, then fits the codebooks with an importance-weighted k-means.

Proxy. Sort the flattened weight, take the consecutive gaps G = diff(sorted) and keep the positive ones
(repeated values add nothing), n = |G|, Gₙ = G / ΣG:

* coarse (uniformity): log n + Σ Gₙ·log Gₙ = KL(Gₙ ‖ uniform). It is 0 for evenly spaced values and grows
  as the spacing gets uneven (dense centre, sparse tails).
* fine (local outliers): with d = Gₙ − 1/n,
  a₁·|mean(d²)| + a₂·|mean(d³)| + a₃·|mean(d⁴)|, a₁ = n²/2, a₂ = n³/6, a₃ = n⁴/12.
  The higher moments pick up a few huge gaps (isolated outliers) that the coarse proxy averages away.

A tensor is scalar-quantized when coarse < τ_c and fine < τ_f, vector-quantized otherwise;
`thresholds_for_share` places (τ_c, τ_f) so that a chosen share of the tensors goes to VQ.

Codebooks (GPTVQ / RWKVQuant style). Vectors are `dim` consecutive elements along the weight's last axis,
each replaced by one of K codewords; the fit minimises Σ h·(w − ŵ)² with a per-element importance h:

* MatMul weights W [in, out] (x @ W): h[i, j] = E[xᵢ²], the diagonal of the layer Hessian XᵀX / N, so errors
  on rows fed by large inputs count more (`hessian_importance`).
* element-wise weights (RWKV's time-mix μ and the like, w ⊙ x): h[..., c] = a statistic of the multiplied
  channel; RWKVQuant's M-step weights every element by its channel's calibrated activation size
  (`activation_importance`; vq_weights passes E[x_c²], which matches the squared error).

k-means++ seeds the codebook, then Lloyd iterations: the E-step assigns each vector to the codeword with the
smallest Σⱼ h[n, j]·(w[n, j] − c[k, j])², the M-step sets each codeword coordinate to the importance-weighted
mean of its members, c[k, j] = Σ h[n, j]·w[n, j] / Σ h[n, j]. Codewords are finally stored as symmetric int8
with one scale per codebook (`quantize_codewords`). Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

INIT_SAMPLE = 20000  # k-means++ runs on at most this many vectors: its cost is O(sample · K)
BLOCK_ELEMENTS = 1 << 21  # E-step block of vectors × codewords: one float64 block of this size = 16 MB
MAX_ENTRIES = 1 << 16  # indices are stored as uint16 at most


# ---------------------------------------------------------------------------------------------------------
# The coarse-to-fine proxy


@dataclass(frozen=True)
class Proxy:
    """RWKVQuant's two scores of one weight tensor: coarse (uneven spacing) and fine (local outliers)."""

    coarse: float
    fine: float

    def choice(self, coarse_threshold: float, fine_threshold: float) -> Literal["scalar", "vector"]:
        """Scalar quantization only for weights that are both evenly spread and free of local outliers."""
        return "scalar" if self.coarse < coarse_threshold and self.fine < fine_threshold else "vector"


def proxy(weight: np.ndarray) -> Proxy:
    """The coarse and fine proxies of a weight tensor (all values, in float64; the sort is O(n log n))."""
    values = np.sort(np.asarray(weight, dtype=np.float64).ravel())
    gaps = np.diff(values)
    gaps = gaps[gaps > 0]  # repeated values carry no spacing information (and log 0 is undefined)
    n = gaps.size
    if n < 2:  # one gap (or none) is trivially uniform
        return Proxy(0.0, 0.0)
    # u = n·Gₙ: 1 everywhere for even spacing. log n + Σ Gₙ log Gₙ = Σ Gₙ log(n Gₙ) = mean(u log u),
    # which avoids cancelling log n against a sum of nearly equal terms.
    u = gaps * (n / gaps.sum())
    coarse = float(np.mean(u * np.log(u)))
    # e = n·d = u − 1. aₖ·mean(dᵏ) = mean((n d)ᵏ) / {2, 6, 12} for k = 2, 3, 4: algebraically identical to the
    # a₁ = n²/2, a₂ = n³/6, a₃ = n⁴/12 form, but with no n⁴ factor or d⁴ underflow for multi-million tensors.
    e = u - 1.0
    e2 = e * e
    fine = abs(np.mean(e2)) / 2 + abs(np.mean(e2 * e)) / 6 + abs(np.mean(e2 * e2)) / 12
    return Proxy(max(coarse, 0.0), float(fine))  # KL ≥ 0; clip rounding noise on perfectly even spacing


def _ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """0 for the smallest value; ties are broken by position, so the ranks are deterministic."""
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    return ranks


def _threshold_above(values: np.ndarray, top: float) -> float:
    """A threshold t with top < t and no value in (top, t]: the midpoint to the next larger value."""
    larger = values[values > top]
    if larger.size == 0:
        return math.inf  # every tensor passes on this axis
    nxt = float(larger.min())
    mid = (top + nxt) / 2
    return mid if mid > top else nxt  # adjacent floats: the next value itself still fails `value < t`


def thresholds_for_share(proxies: list[Proxy], vector_share: float) -> tuple[float, float]:
    """(coarse, fine) thresholds that send about `vector_share` of the tensors to vector quantization.

    The rule: k = floor(share · m + ½) tensors (clipped to [0, m]) should be "vector", the rest "scalar".
    Tensors are ordered by a combined score, rank(coarse) + rank(fine) (ties: lower coarse, then lower fine,
    then list order). The scalar region {coarse < τ_c and fine < τ_f} is grown as the bounding box of the
    lowest-scoring tensors, one tensor at a time, each threshold placed midway between the box's largest
    value and the next larger value of any tensor (∞ when there is none). A box may also take in tensors
    outside the added set, so the scalar count is not always exactly m − k: the box whose count is closest to
    m − k is kept, and on a tie the smaller one (more tensors keep the more accurate vector quantization).
    With k = m the thresholds are the smallest values themselves, which nothing passes (the test is strict).
    """
    if not 0.0 <= vector_share <= 1.0:
        raise ValueError(f"vector_share {vector_share}: must lie in [0, 1]")
    m = len(proxies)
    if m == 0:
        return math.inf, math.inf
    coarse = np.array([p.coarse for p in proxies], dtype=np.float64)
    fine = np.array([p.fine for p in proxies], dtype=np.float64)
    vector = min(max(math.floor(vector_share * m + 0.5), 0), m)
    target = m - vector  # how many tensors should be scalar
    score = _ordinal_ranks(coarse) + _ordinal_ranks(fine)
    order = np.lexsort((np.arange(m), fine, coarse, score))  # last key is the primary one

    best = (float(coarse.min()), float(fine.min()))  # the empty box: no tensor is scalar
    best_count = 0
    for j in range(1, m + 1):
        if best_count >= target:
            break
        box = order[:j]
        thresholds = (_threshold_above(coarse, float(coarse[box].max())),
                      _threshold_above(fine, float(fine[box].max())))
        count = int(np.count_nonzero((coarse < thresholds[0]) & (fine < thresholds[1])))
        if count >= target and count - target >= target - best_count:
            break  # overshoots by more than the previous box falls short: keep the previous one
        best, best_count = thresholds, count
    return best


# ---------------------------------------------------------------------------------------------------------
# Importance-weighted k-means codebooks


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to a single bool
class Codebook:
    """A vector-quantized weight: codewords, one index per vector, and the weight's layout."""

    values: np.ndarray  # [K, dim] float32 codewords
    indices: np.ndarray  # [N] uint8 when K <= 256 else uint16
    dim: int
    shape: tuple[int, ...]  # the original weight shape

    def reconstruct(self) -> np.ndarray:
        """The weight the codebook stands for (float32, original shape)."""
        return self.values[self.indices.astype(np.int64)].reshape(self.shape).astype(np.float32, copy=False)

    def bits_per_weight(self, codeword_bits: int = 8) -> float:
        """Storage per weight: the indices, the codewords at `codeword_bits` each, and one 32-bit scale."""
        entries = self.values.shape[0]
        total = self.indices.size * math.log2(entries) + entries * self.dim * codeword_bits + 32
        return total / math.prod(self.shape)


def _index_dtype(entries: int) -> type[np.unsignedinteger]:
    return np.uint8 if entries <= 256 else np.uint16


def _as_vectors(weight: np.ndarray, dim: int) -> np.ndarray:
    """[N, dim] float32 view of the weight: consecutive `dim` elements along the last axis."""
    if weight.ndim < 1 or weight.size == 0:
        raise ValueError("vector quantization needs a non-empty weight of rank >= 1")
    if dim < 1 or weight.shape[-1] % dim:
        raise ValueError(f"weight's last axis ({weight.shape[-1]}) is not divisible by the vector dim {dim}")
    return np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, dim)


def _importance_vectors(importance: np.ndarray | None, shape: tuple[int, ...], dim: int) -> np.ndarray:
    if importance is None:
        return np.ones((math.prod(shape) // dim, dim), dtype=np.float32)
    h = np.asarray(importance)
    if h.shape != shape:
        raise ValueError(f"importance shape {h.shape} differs from the weight shape {shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError("importance must be finite and non-negative")
    return np.ascontiguousarray(h, dtype=np.float32).reshape(-1, dim)


def _weighted_distances(w: np.ndarray, h: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Σⱼ h[n,j]·(w[n,j] − c[k,j])² for a block, [B, K], without the Σ h·w² term (it is the same for every k).

    Expanded as h·c² − 2·(h·w)·c and fused into one [B, 2·dim] @ [2·dim, K] matmul: no [B, K, dim] array,
    and one pass over the [B, K] output (the inner dimension is tiny, so the output's memory traffic is the cost).
    """
    c = centers.astype(np.float64)
    return np.concatenate([h, h * w], axis=1) @ np.concatenate([c * c, -2.0 * c], axis=1).T


def _assign(w: np.ndarray, h: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E-step: each vector's nearest codeword and its weighted error, in blocks that keep memory bounded."""
    n = w.shape[0]
    block = max(1, BLOCK_ELEMENTS // centers.shape[0])
    index = np.empty(n, dtype=np.int32)  # K <= 65536; half the memory of int64 for million-vector tensors
    error = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        wb = w[start:start + block].astype(np.float64)
        hb = h[start:start + block].astype(np.float64)
        d = _weighted_distances(wb, hb, centers)
        best = d.argmin(axis=1)
        index[start:start + block] = best
        # add back Σ h·w²; clip the expansion's rounding below zero
        error[start:start + block] = np.maximum(d[np.arange(best.size), best] + (hb * wb * wb).sum(axis=1), 0.0)
    return index, error


def _update(w: np.ndarray, h: np.ndarray, index: np.ndarray, error: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """M-step: importance-weighted means per coordinate; empty codewords move to the worst-served vectors."""
    entries, dim = centers.shape
    new = centers.astype(np.float64)
    for j in range(dim):
        hj = h[:, j].astype(np.float64)
        den = np.bincount(index, weights=hj, minlength=entries)
        num = np.bincount(index, weights=hj * w[:, j], minlength=entries)
        ok = den > 0  # a coordinate nobody weighs keeps its value: any value is equally good
        new[ok, j] = num[ok] / den[ok]
    empty = np.flatnonzero(np.bincount(index, minlength=entries) == 0)
    if empty.size:  # a dead codeword is wasted: give it to the vectors served worst
        worst = np.argsort(-error, kind="stable")[:empty.size]
        new[empty[:worst.size]] = w[worst]
    return new.astype(np.float32)


def _kmeans_pp(w: np.ndarray, h: np.ndarray, entries: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding under the weighted distance, on a subsample (the seeding is O(sample · K))."""
    if w.shape[0] > INIT_SAMPLE:
        pick = np.sort(rng.choice(w.shape[0], INIT_SAMPLE, replace=False))
        w, h = w[pick], h[pick]
    w64, h64 = w.astype(np.float64), h.astype(np.float64)
    centers = np.empty((entries, w.shape[1]), dtype=np.float32)
    centers[0] = w[rng.integers(w.shape[0])]
    nearest = (h64 * (w64 - centers[0]) ** 2).sum(axis=1)
    for k in range(1, entries):
        total = nearest.sum()
        if total <= 0:  # every sampled vector is already a codeword: fill up, the M-step reseeds duplicates
            centers[k:] = w[rng.integers(w.shape[0], size=entries - k)]
            break
        centers[k] = w[rng.choice(w.shape[0], p=nearest / total)]
        np.minimum(nearest, (h64 * (w64 - centers[k]) ** 2).sum(axis=1), out=nearest)
    return centers


def _exact_codebook(vectors: np.ndarray, entries: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The distinct vectors themselves when there are at most `entries` of them (zero error), else None."""
    if vectors.shape[0] > INIT_SAMPLE:  # cheap reject before sorting every vector
        probe = vectors[np.linspace(0, vectors.shape[0] - 1, INIT_SAMPLE).astype(np.int64)]
        if np.unique(probe, axis=0).shape[0] > entries:
            return None
    distinct, inverse = np.unique(vectors, axis=0, return_inverse=True)
    if distinct.shape[0] > entries:
        return None
    padding = np.repeat(distinct[-1:], entries - distinct.shape[0], axis=0)  # unused codewords
    return np.concatenate([distinct, padding]), inverse.reshape(-1)


def fit_codebook(weight: np.ndarray, *, dim: int, entries: int, importance: np.ndarray | None = None,
                 iterations: int = 25, seed: int = 0) -> Codebook:
    """Fit a K = `entries` codebook of `dim`-element vectors (along the last axis) minimising Σ h·(w − ŵ)².

    `importance` h has the weight's shape (None: all ones). `iterations` bounds the Lloyd iterations
    (0: the k-means++ seeding with its assignment); they stop early once no assignment changes. A weight
    with at most `entries` distinct vectors is reproduced exactly.
    """
    weight = np.asarray(weight)
    if not 1 <= entries <= MAX_ENTRIES:
        raise ValueError(f"entries {entries}: must lie in [1, {MAX_ENTRIES}]")
    w = _as_vectors(weight, dim)
    h = _importance_vectors(importance, weight.shape, dim)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight has non-finite values")

    exact = _exact_codebook(w, entries)
    if exact is not None:
        centers, index = exact
    else:
        centers = _kmeans_pp(w, h, entries, np.random.default_rng(seed))
        index, error = _assign(w, h, centers)
        for _ in range(iterations):
            centers = _update(w, h, index, error, centers)
            new_index, error = _assign(w, h, centers)
            converged = np.array_equal(new_index, index)
            index = new_index
            if converged:
                break
    return Codebook(values=np.ascontiguousarray(centers, dtype=np.float32), indices=index.astype(_index_dtype(entries)),
                    dim=dim, shape=tuple(weight.shape))


def assign_with_feedback(weight: np.ndarray, book: Codebook, hessian: np.ndarray, *, damping: float = 0.01) -> Codebook:
    """GPTVQ-style assignment: the codewords stay, the indices are chosen row by row under the layer Hessian.

    `weight` is a MatMul weight W [in, out] (x @ W) and `hessian` H = E[xᵀx] [in, in]. As in GPTQ, input
    row i is quantized (each of its vectors to the nearest codeword), and its error, scaled by the inverse
    Hessian's Cholesky factor U, is pushed onto the rows not yet quantized: W[i+1:] −= U[i, i+1:]ᵀ·(w_i −
    ŵ_i) / U[i, i]. Later rows absorb what earlier ones lost, so the layer's output moves less than with
    each vector rounded on its own. `damping` × mean(diag H) is added to H's diagonal (dead inputs, round-off).
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or hessian.shape != (w.shape[0], w.shape[0]) or w.shape != book.shape:
        raise ValueError(f"weight {w.shape}, codebook {book.shape} and Hessian {hessian.shape} do not match")
    h = hessian.astype(np.float64) + damping * max(float(np.mean(np.diag(hessian))), 1e-12) * np.eye(w.shape[0])
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular: inv(H) = Uᵀ·U
    centers = book.values.astype(np.float64)
    ones = np.ones((w.shape[1] // book.dim, book.dim))
    index = np.empty((w.shape[0], w.shape[1] // book.dim), dtype=np.int32)
    for i in range(w.shape[0]):
        row = w[i].reshape(-1, book.dim)
        index[i], _ = _assign(row, ones, centers)
        error = (w[i] - centers[index[i]].reshape(-1)) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], error)
    return Codebook(values=book.values, indices=index.reshape(-1).astype(book.indices.dtype), dim=book.dim,
                    shape=book.shape)


# ---------------------------------------------------------------------------------------------------------
# Integer codewords


def quantize_codewords(book: Codebook, bits: int = 8) -> tuple[np.ndarray, float]:
    """Symmetric integer codewords with one scale per codebook: (int8 [K, dim], scale).

    scale = max|c| / qmax with qmax = 2^(bits−1) − 1 (1.0 when every codeword is 0); the integers lie in
    [−qmax, qmax]. The scale is a float32 value, as the graph's dequantization will use it.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"codeword bits {bits}: must lie in [2, 8] (stored as int8)")
    qmax = 2 ** (bits - 1) - 1
    amax = float(np.abs(book.values).max()) if book.values.size else 0.0
    scale = np.float32(amax) / np.float32(qmax) if amax > 0 else np.float32(1.0)
    q = np.clip(np.round(book.values.astype(np.float32) / scale), -qmax, qmax).astype(np.int8)
    return q, float(scale)


def with_quantized_codewords(book: Codebook, bits: int = 8,
                             reassign: tuple[np.ndarray, np.ndarray | None] | None = None) -> Codebook:
    """The codebook with its codewords replaced by their dequantized integers: what the ONNX graph computes.

    With `reassign` = (weight, importance or None), every vector is then assigned afresh to its nearest
    rounded codeword: rounding moves codewords (and may merge some), so the fitted assignment is no longer
    the best one."""
    q, scale = quantize_codewords(book, bits)
    values = q.astype(np.float32) * np.float32(scale)
    indices = book.indices
    if reassign is not None:
        weight, importance = reassign
        w = _as_vectors(np.asarray(weight), book.dim)
        index, _ = _assign(w, _importance_vectors(importance, tuple(np.shape(weight)), book.dim), values)
        indices = index.astype(book.indices.dtype)
    return Codebook(values=values, indices=indices, dim=book.dim, shape=book.shape)


# ---------------------------------------------------------------------------------------------------------
# Importance from calibration statistics


def _check_statistic(stat: np.ndarray, length: int, what: str) -> np.ndarray:
    stat = np.asarray(stat, dtype=np.float32)
    if stat.shape != (length,):
        raise ValueError(f"{what} has shape {stat.shape}, expected ({length},)")
    if not np.all(np.isfinite(stat)) or np.any(stat < 0):
        raise ValueError(f"{what} must be finite and non-negative")
    return stat


def activation_importance(channel_size: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Importance of an element-wise weight (w ⊙ x, channels on the last axis): the channel's activation size
    (E|x_c|, or E[x_c²] for a squared-error fit) for every element of channel c.

    The error w − ŵ reaches the output multiplied by x, so channels with large activations weigh more.
    """
    shape = tuple(shape)
    stat = _check_statistic(channel_size, shape[-1], "activation size")
    return np.ascontiguousarray(np.broadcast_to(stat, shape))


def hessian_importance(second_moment_diag: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Importance of a MatMul weight W [in, out] (x @ W): h[i, j] = E[xᵢ²], the Hessian diagonal, along axis 0.

    Row i's error is multiplied by xᵢ in every output, so its squared contribution scales with E[xᵢ²].
    """
    shape = tuple(shape)
    stat = _check_statistic(second_moment_diag, shape[0], "E[x^2] diagonal")
    return np.ascontiguousarray(np.broadcast_to(stat.reshape((shape[0],) + (1,) * (len(shape) - 1)), shape))
