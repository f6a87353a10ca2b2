"""NumPy integer reference of I-LLM's integer-only operators.

Written with integer arithmetic only (int64 arrays, `>>`, `<<`, `//`), independently of the ONNX
subgraphs `passes/integer_ops.py` emits; the tests check the two agree bit for bit. Where an
operator starts from a float tensor (the quantization of its input), the float32 step is written
out here with the same float32 operations the graph uses.

DI-Exp (I-ViT "Shiftmax" with a dyadic input scale m/2^k; §4.3): x_I <= 0, x = x_I · m / 2^k.
    m_f = m + (m >> 1) - (m >> 4)          ≈ m · log2(e)
    s   = round(2^k / m_f)                 x_I units per unit of -log2
    q   = floor(x_I / -s)                  integer part of -x · log2(e)
    r   = x_I + q · s                      in (-s, 0]
    e_I = (((r >> 1) + s) << P) >> q       2^(r/s) ≈ 1 + r/(2s), then / 2^q
    exp(x) ≈ e_I / (s · 2^P)

DI-ClippedSoftmax (§4.4): Δ = max(x - max_row x, -c); x_I = round(Δ · 2^k / m) with m/2^k ≈ c / L_in
(L_in = 2^bits - 1), so x_I in [-L_in, 0]; e_I = DI-Exp(x_I); S = Σ e_I; M = (L_out << R) // S
(one integer division per row); p_I = (e_I · M) >> R in [0, L_out]; p ≈ p_I / L_out.

DI-Norm (§4.5; the paper's formula is unverified, this is our integer design): per-token dynamic
requantization x_I = round(x · K / max|x|), K = 2^(bits-1) - 1 (a per-token scale, which any
normalisation cancels); LayerNorm: μ = Σ x_I // H, d = x_I - μ (RMSNorm: d = x_I); the squares are
reduced by a rounding shift, Q = Σ ((d² + 2^(k-1)) >> k), so the sum fits 24 bits; r = round(√Q)
by the bit-wise (digit-by-digit) integer square root; y_I = round(d · 2^F / r) (integer division with
rounding); y = y_I · (2^-F · √H · 2^(-k/2)) · γ + β. ε is not added (its effect is below 1e-3
relative while the variance exceeds 500 ε). Every intermediate stays below 2^24, so float32 can
carry the integers exactly: that is what the ONNX form relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32
EXACT = 1 << 24  # float32 carries every integer of magnitude <= 2^24 exactly


def dyadic(scale: float, bits: int = 8) -> tuple[int, int]:
    """(m, k) with m / 2^k ≈ scale and m a `bits`-bit integer in [2^(bits-1), 2^bits - 1]."""
    if scale <= 0:
        raise ValueError("scale must be positive")
    k = bits - 1 - math.floor(math.log2(scale))
    m = round(scale * 2 ** k)
    if m >= 1 << bits:
        m, k = round(scale * 2 ** (k - 1)), k - 1
    return int(m), int(k)


def di_exp_step(m: int, k: int) -> int:
    """s = round(2^k / m_f), m_f = m + (m >> 1) - (m >> 4): the x_I units per unit of -log2."""
    m_f = m + (m >> 1) - (m >> 4)
    return ((1 << k) + m_f // 2) // m_f


def di_exp(x_int: np.ndarray, m: int, k: int, precision: int) -> np.ndarray:
    """DI-Exp of integers x_I <= 0 (scale m/2^k); exp(x) ≈ result / (s · 2^precision)."""
    x = np.asarray(x_int, dtype=np.int64)
    if np.any(x > 0):
        raise ValueError("DI-Exp takes x_I <= 0 (subtract the row max first)")
    s = di_exp_step(m, k)
    q = x // -s
    r = x + q * s
    base = ((r >> 1) + s) << precision
    return base >> np.minimum(q, 62)


# --------------------------------------------------------------------------------------------
# DI-ClippedSoftmax


@dataclass(frozen=True)
class SoftmaxParams:
    clip: float = 15.0        # c: Δ is clipped to [-c, 0]
    in_bits: int = 8          # x_I in [-(2^in_bits - 1), 0]
    out_levels: int = 127     # p_I in [0, out_levels]; 127 = what a symmetric INT8 Q/DQ holds exactly
    max_row: int = 1024       # longest row the sums must hold exactly
    shift: int = 17           # R of the per-row multiplier M = (out_levels << R) // S

    @property
    def in_levels(self) -> int:
        return (1 << self.in_bits) - 1

    @property
    def mk(self) -> tuple[int, int]:
        return dyadic(self.clip / self.in_levels, 8)

    @property
    def s(self) -> int:
        return di_exp_step(*self.mk)

    @property
    def precision(self) -> int:
        """P: as many bits as keep Σ e_I <= 2^R for the longest row (so M >= out_levels)."""
        return max(0, self.shift - math.ceil(math.log2(self.max_row * (self.s + 1))))

    def check(self) -> None:
        if self.out_levels * (1 << self.shift) > EXACT:
            raise ValueError("out_levels << shift must stay within 2^24")
        if self.max_row * (self.s + 1) << self.precision > EXACT:
            raise ValueError("rows too long for float32-exact sums")


def quantize_clipped(delta: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """x_I (as float32 integers) from Δ = x - row max, with the graph's float32 ops: Clip, Mul, Round, Max."""
    m, k = p.mk
    c = np.clip(np.asarray(delta, dtype=F32), F32(-p.clip), F32(0))
    return np.maximum(np.round(c * F32(2 ** k / m)), F32(-p.in_levels))


def di_softmax_int(x_int: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """p_I of DI-ClippedSoftmax over the last axis, from integers x_I in [-L_in, 0]."""
    m, k = p.mk
    e = di_exp(x_int, m, k, p.precision)
    total = e.sum(axis=-1, keepdims=True)
    multiplier = (p.out_levels << p.shift) // total
    return (e * multiplier) >> p.shift


def di_softmax(x: np.ndarray, p: SoftmaxParams = SoftmaxParams()) -> np.ndarray:
    """DI-ClippedSoftmax of float logits over the last axis, as float32 probabilities p_I / L_out."""
    x = np.asarray(x, dtype=F32)
    delta = x - x.max(axis=-1, keepdims=True)
    x_int = quantize_clipped(delta, p).astype(np.int64)
    return di_softmax_int(x_int, p).astype(F32) * F32(1.0 / p.out_levels)


# --------------------------------------------------------------------------------------------
# DI-Norm


@dataclass(frozen=True)
class NormParams:
    hidden: int               # H, the normalised (last) axis
    rms: bool = False         # RMSNorm (no mean) instead of LayerNorm
    bits: int = 12            # per-token dynamic requantization to K = 2^(bits-1) - 1

    @property
    def K(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def max_d(self) -> int:
        return self.K if self.rms else 2 * self.K

    @property
    def square_shift(self) -> int:
        """k: the smallest rounding shift of d² that keeps Σ over H within 2^24."""
        k = 0
        while self.hidden * ((self.max_d ** 2 + (1 << k >> 1)) >> k) >= EXACT:
            k += 1
        return k

    @property
    def sqrt_bits(self) -> int:
        """Q < 2^24, so √Q < 2^12: twelve digits."""
        return 12

    @property
    def frac_bits(self) -> int:
        """F: output bits below the normalised unit, as many as keep d · 2^(F+1) + r within 2^24."""
        f = 0
        while self.max_d * (1 << (f + 2)) + (1 << self.sqrt_bits) <= EXACT:
            f += 1
        return f

    @property
    def out_scale(self) -> float:
        """y = y_I · out_scale is d / σ (σ² = Σ d² / H)."""
        return 2.0 ** -self.frac_bits * math.sqrt(self.hidden) * 2.0 ** (-self.square_shift / 2)

    def check(self) -> None:
        if self.max_d ** 2 > EXACT:
            raise ValueError(f"bits={self.bits} too wide: d² would exceed 2^24")
        if self.hidden * self.K >= EXACT:
            raise ValueError("hidden size too large for float32-exact sums")


def requantize_per_token(x: np.ndarray, p: NormParams) -> np.ndarray:
    """x_I (float32 integers): x · (K / max|x|) rounded half to even, float32 ops as in the graph."""
    x = np.asarray(x, dtype=F32)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), F32(1e-30))
    inv = F32(p.K) / amax
    return np.round(x * inv)


def isqrt_round(n: np.ndarray, bits: int = 12) -> np.ndarray:
    """round(√n) for 0 <= n < 2^(2·bits), digit by digit (one candidate bit per step, high to low)."""
    n = np.asarray(n, dtype=np.int64)
    root = np.zeros_like(n)
    for b in range(bits - 1, -1, -1):
        candidate = root + (1 << b)
        root = np.where(candidate * candidate <= n, candidate, root)
    return root + (n - root * root > root)


def di_norm_int(x_int: np.ndarray, p: NormParams) -> np.ndarray:
    """y_I of DI-Norm over the last axis from integers x_I (|x_I| <= K)."""
    x = np.asarray(x_int, dtype=np.int64)
    if p.rms:
        d = x
    else:
        d = x - x.sum(axis=-1, keepdims=True) // p.hidden
    k = p.square_shift
    squares = (d * d + ((1 << k) >> 1)) >> k
    q = squares.sum(axis=-1, keepdims=True)
    r = np.maximum(isqrt_round(q, p.sqrt_bits), 1)
    return (d * (1 << (p.frac_bits + 1)) + r) // (2 * r)


def di_norm(x: np.ndarray, p: NormParams, gamma: np.ndarray | None = None, beta: np.ndarray | None = None) -> np.ndarray:
    """DI-Norm of float input over the last axis (float32 output with γ, β applied as the graph does)."""
    y_int = di_norm_int(requantize_per_token(x, p).astype(np.int64), p).astype(F32)
    g = F32(p.out_scale) * (np.ones(p.hidden, F32) if gamma is None else np.asarray(gamma, F32))
    y = y_int * g.astype(F32)
    return y if beta is None else y + np.asarray(beta, F32)


# --------------------------------------------------------------------------------------------
# Function-level forms for the benchmark (I-LLM §4.6: sigmoid from DI-Exp)


def di_exp_function(x: np.ndarray, lo: float, precision: int = 8) -> np.ndarray:
    """exp over [lo, 0] the I-LLM way: 8-bit input x_I = round(x / (m/2^k)), m/2^k ≈ -lo/255, then DI-Exp."""
    m, k = dyadic(-lo / 255.0, 8)
    x_int = np.maximum(np.round(np.clip(np.asarray(x, np.float64), lo, 0) * 2 ** k / m), -255).astype(np.int64)
    return di_exp(x_int, m, k, precision) / (di_exp_step(m, k) * 2.0 ** precision)


def di_sigmoid_function(x: np.ndarray, amax: float, precision: int = 8) -> np.ndarray:
    """σ(x) from DI-Exp of -|x| (8-bit input over [-amax, amax]): σ = e(0)/(e(0)+e(-x)), mirrored for x < 0."""
    m, k = dyadic(amax / 127.0, 8)
    x_int = np.clip(np.round(np.asarray(x, np.float64) * 2 ** k / m), -127, 127).astype(np.int64)
    one = di_exp(np.zeros_like(x_int), m, k, precision)
    e = di_exp(-np.abs(x_int), m, k, precision)
    pos = one / (one + e)
    return np.where(x_int >= 0, pos, 1 - pos)
