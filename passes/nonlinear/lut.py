"""Lookup tables for nonlinear functions, in pure NumPy: FQ-PETR's dual LUT (DULUT), the uniform
LUT it is compared with, the exact 256-entry table of an INT8 input, and their fidelity.

DULUT (the paper gives no formulas; this is a reconstruction, made error-driven). Two cascaded
linearly interpolated tables over a domain [lo, hi]:

    a = (clip(x, lo, hi) - lo) / Δ1           Δ1 = (hi - lo) / (N1 - 1)
    i = min(floor(a), N1 - 2)
    u = LUT1[i] + (a - i) · (LUT1[i+1] - LUT1[i])      # non-uniform index in [0, N2 - 1]
    j = min(floor(u), N2 - 2)
    y = LUT2[j] + (u - j) · (LUT2[j+1] - LUT2[j])      # function value

LUT1 is a monotone warp: where the function bends it climbs steeply, so many LUT2 entries fall in a
short stretch of x; where the function is nearly linear one LUT2 interval covers a long stretch. The
warp starts from the density ρ ∝ √|f''| (the optimal knot density of linear interpolation) and is
then refined by the measured error: LUT1 and LUT2 move together down the gradient of the p-norm of
the error of the emitted computation, p rising from 8 to 128, so the objective becomes the max
error (the kinks that interpolating LUT1 puts inside LUT2 intervals are part of what is measured,
which the √|f''| warp alone ignores and pays for with errors of several steps). LUT2 is finally
fitted to minimise the max error of the float32 computation (Lawson's reweighted least squares; the
output is linear in LUT2 once the warp is fixed). Each table is stored with its forward differences
(the slope table), as LUT hardware does, so each level is two gathers at one index; "entries" counts
the values only.

Outside [lo, hi] the function follows its asymptote: y += slope · (x - clip(x)), with slope 1 on the
right for GELU/SiLU/Softplus/HardSwish and 0 elsewhere. The domain is the calibrated input range,
shrunk to where the function differs from its asymptotes by more than 1% of an output step.

Error unit: one INT8 output step = (max f - min f over the calibrated range) / 255, the finest step
an 8-bit output of that range can have (for symmetric INT8 of a one-signed output the step is twice
that, so the figures here are conservative). The fidelity of a table is the max and mean of
|table(x) - f(x)| over a dense grid of the calibrated range, in those steps, computed by the same
float32 operations, in the same order, as the ONNX subgraph the passes emit (tests check that ONNX
Runtime reproduces `DualLUT.__call__`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

F32 = np.float32


# --------------------------------------------------------------------------------------------
# The functions


def erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


@dataclass(frozen=True)
class Function:
    """A scalar nonlinearity with float64 reference `f` and its straight-line asymptotes."""

    name: str
    f: Callable[[np.ndarray], np.ndarray]
    left: tuple[float, float] | None   # (slope, intercept) of the asymptote at -inf, None if it has none
    right: tuple[float, float] | None  # same at +inf
    onnx_op: str                       # the ONNX op computing it (or the op at the heart of its pattern)

    def __call__(self, x):
        return self.f(np.asarray(x, dtype=np.float64))

    def tail_slopes(self) -> tuple[float, float]:
        return (self.left[0] if self.left else 0.0), (self.right[0] if self.right else 0.0)


FUNCTIONS: dict[str, Function] = {f.name: f for f in [
    Function("gelu", lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))), (0.0, 0.0), (1.0, 0.0), "Gelu"),
    Function("gelu_tanh", lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
             (0.0, 0.0), (1.0, 0.0), "Gelu"),
    Function("quick_gelu", lambda x: x * _sigmoid(1.702 * x), (0.0, 0.0), (1.0, 0.0), "Sigmoid"),
    Function("silu", lambda x: x * _sigmoid(x), (0.0, 0.0), (1.0, 0.0), "Sigmoid"),
    Function("sigmoid", _sigmoid, (0.0, 0.0), (0.0, 1.0), "Sigmoid"),
    Function("softplus", lambda x: np.logaddexp(0.0, x), (0.0, 0.0), (1.0, 0.0), "Softplus"),
    Function("tanh", np.tanh, (0.0, -1.0), (0.0, 1.0), "Tanh"),
    Function("hardswish", lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0), (0.0, 0.0), (1.0, 0.0), "HardSwish"),
    Function("hardsigmoid", lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0), (0.0, 0.0), (0.0, 1.0), "HardSigmoid"),
    Function("exp", np.exp, (0.0, 0.0), None, "Exp"),
]}


def get_function(name: str) -> Function:
    if name not in FUNCTIONS:
        raise KeyError(f"no lookup-table function '{name}' (known: {', '.join(FUNCTIONS)})")
    return FUNCTIONS[name]


def output_step(fn: Function, lo: float, hi: float, points: int = 20001) -> float:
    """One INT8 output step of `fn` over [lo, hi]: (max f - min f) / 255."""
    y = fn(np.linspace(lo, hi, points))
    span = float(y.max() - y.min())
    return span / 255.0 if span > 0 else 1.0


def table_domain(fn: Function, lo: float, hi: float, tolerance: float = 0.01) -> tuple[float, float]:
    """The part of [lo, hi] the table must cover: outside it `fn` is within `tolerance` output steps
    of its asymptote, which the emitted tail term reproduces."""
    step = output_step(fn, lo, hi)
    x = np.linspace(lo, hi, 20001)
    y = fn(x)
    new_lo, new_hi = lo, hi
    if fn.left is not None:
        off = np.abs(y - (fn.left[0] * x + fn.left[1])) > tolerance * step
        if off.any():
            new_lo = float(x[max(int(np.argmax(off)) - 1, 0)])
    if fn.right is not None:
        off = np.abs(y - (fn.right[0] * x + fn.right[1])) > tolerance * step
        if off.any():
            new_hi = float(x[min(len(x) - 1 - int(np.argmax(off[::-1])) + 1, len(x) - 1)])
    if new_hi - new_lo < 1e-3 * (hi - lo) or new_hi <= new_lo:  # (nearly) all asymptote: keep a small table
        return lo, hi
    return new_lo, new_hi


# --------------------------------------------------------------------------------------------
# Tables and their float32 evaluation (exactly the op sequence the passes emit)


def _lerp_level(a: np.ndarray, values: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """One linearly interpolated table read at fractional index a >= 0: Floor, Min, Sub, Gather×2, Mul, Add."""
    i = np.minimum(np.floor(a), F32(len(values) - 2))
    frac = a - i
    idx = i.astype(np.int32)
    return values[idx] + frac * slopes[idx]


@dataclass
class UniformLUT:
    """A single table of `values` on a uniform grid over [lo, hi], read with linear interpolation."""

    lo: float
    hi: float
    values: np.ndarray
    tails: tuple[float, float] = (0.0, 0.0)  # asymptote slopes applied outside [lo, hi]
    kind: str = "uniform"

    def __post_init__(self):
        self.lo, self.hi = float(F32(self.lo)), float(F32(self.hi))
        self.values = np.asarray(self.values, dtype=F32)

    @property
    def entries(self) -> int:
        return len(self.values)

    @property
    def slopes(self) -> np.ndarray:
        return np.append(np.diff(self.values), F32(0)).astype(F32)

    @property
    def inv_step(self) -> np.float32:
        return F32((len(self.values) - 1) / (self.hi - self.lo))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32)
        c = np.clip(x, F32(self.lo), F32(self.hi))
        a = (c - F32(self.lo)) * self.inv_step
        return _add_tails(_lerp_level(a, self.values, self.slopes), x, c, self.tails)


@dataclass
class DualLUT:
    """FQ-PETR's dual LUT: `index` (LUT1, N1 entries, monotone from 0 to N2-1) maps the uniform grid
    on [lo, hi] to a fractional index into `values` (LUT2, N2 entries)."""

    lo: float
    hi: float
    index: np.ndarray
    values: np.ndarray
    tails: tuple[float, float] = (0.0, 0.0)
    kind: str = "dulut"
    history: list[float] = field(default_factory=list, repr=False)  # max error (steps) per refinement round

    def __post_init__(self):
        self.lo, self.hi = float(F32(self.lo)), float(F32(self.hi))
        self.index = np.asarray(self.index, dtype=F32)
        self.values = np.asarray(self.values, dtype=F32)

    @property
    def entries(self) -> int:
        return len(self.index) + len(self.values)

    @property
    def index_slopes(self) -> np.ndarray:
        return np.append(np.diff(self.index), F32(0)).astype(F32)

    @property
    def value_slopes(self) -> np.ndarray:
        return np.append(np.diff(self.values), F32(0)).astype(F32)

    @property
    def inv_step(self) -> np.float32:
        return F32((len(self.index) - 1) / (self.hi - self.lo))

    def position(self, x: np.ndarray) -> np.ndarray:
        """u(x): the fractional LUT2 index LUT1 gives for x."""
        c = np.clip(np.asarray(x, dtype=F32), F32(self.lo), F32(self.hi))
        return _lerp_level((c - F32(self.lo)) * self.inv_step, self.index, self.index_slopes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32)
        c = np.clip(x, F32(self.lo), F32(self.hi))
        u = _lerp_level((c - F32(self.lo)) * self.inv_step, self.index, self.index_slopes)
        return _add_tails(_lerp_level(u, self.values, self.value_slopes), x, c, self.tails)


def _add_tails(y, x, c, tails):
    left, right = tails
    if right:
        t = np.maximum(x - c, F32(0))
        y = y + (t if right == 1.0 else t * F32(right))
    if left:
        t = np.maximum(c - x, F32(0))
        y = y - t * F32(left)
    return y


# --------------------------------------------------------------------------------------------
# Construction


def build_uniform(fn: Function | str, lo: float, hi: float, entries: int = 256, *, fit: bool = True,
                  shrink: bool = True) -> UniformLUT:
    """A uniform table of `entries` values on [lo, hi] (the calibrated range, shrunk to where `fn`
    leaves its asymptotes when `shrink`); entries are f(grid), or minimax-fitted when `fit`."""
    fn = get_function(fn) if isinstance(fn, str) else fn
    dlo, dhi = table_domain(fn, lo, hi) if shrink else (lo, hi)
    lut = UniformLUT(dlo, dhi, fn(np.linspace(dlo, dhi, entries)), fn.tail_slopes())
    if fit:
        x = _grid(lut.lo, lut.hi)
        c = np.clip(x.astype(F32), F32(lut.lo), F32(lut.hi))
        a = (c - F32(lut.lo)) * lut.inv_step
        lut.values = _minimax_values(a, fn(x) - _tail_term(x, lut), entries, lut.values)
    return lut


def build_dulut(fn: Function | str, lo: float, hi: float, entries: tuple[int, int] = (32, 32), *,
                iterations: int = 200, fit: bool = True, shrink: bool = True) -> DualLUT:
    """DULUT with N1 + N2 = `entries` for `fn` on the calibrated range [lo, hi].

    The allocation starts from ρ ∝ √|f''| and is refined by the measured error: LUT1 (through
    positive increments, so it stays monotone) and LUT2 are moved together down the gradient of
    the p-norm of the error of the emitted computation, p = 8 → 128 (so the objective tends to the
    max error), with BFGS, `iterations` steps per p. `fit` ends with a minimax fit of LUT2 to the
    float32 warp. `history` keeps the max error (output steps) after each stage.
    """
    fn = get_function(fn) if isinstance(fn, str) else fn
    n1, n2 = entries
    if n1 < 2 or n2 < 2:
        raise ValueError("each DULUT level needs at least 2 entries")
    dlo, dhi = table_domain(fn, lo, hi) if shrink else (lo, hi)
    step = output_step(fn, lo, hi)
    fine = np.linspace(dlo, dhi, 8193)
    lut = _dulut_from_density(fn, dlo, dhi, n1, n2, fine, _curvature_density(fn, fine))
    x = _grid(dlo, dhi)
    target = fn(x)
    history = [float(np.abs(lut(x) - target).max() / step)]
    if iterations:
        for refined in _refine(fn, lut, step, iterations):
            lut = refined
            history.append(float(np.abs(lut(x) - target).max() / step))
    if fit:
        lut.values = _minimax_values(lut.position(x), target - _tail_term(x, lut), n2, lut.values)
        history.append(float(np.abs(lut(x) - target).max() / step))
    lut.history = history
    return lut


def _refine(fn: Function, lut: DualLUT, step: float, iterations: int, points: int = 4001,
            powers: tuple[int, ...] = (8, 16, 32, 64, 128)):
    """Yield the table after each stage of error-driven refinement (see build_dulut)."""
    from scipy.optimize import minimize

    n1, n2 = len(lut.index), len(lut.values)
    x = np.linspace(lut.lo, lut.hi, points)
    target = fn(x) / step                                    # work in output steps
    a = (x - lut.lo) / (lut.hi - lut.lo) * (n1 - 1)
    i = np.minimum(np.floor(a), n1 - 2).astype(int)
    fa = a - i

    def unpack(z):
        w = np.exp(z[:n1 - 1] - z[:n1 - 1].max())           # LUT1 increments, > 0
        cum = np.concatenate([[0.0], np.cumsum(w)])
        return w, cum, (n2 - 1) * cum / cum[-1], z[n1 - 1:]

    def objective(z, p):
        w, cum, index, values = unpack(z)
        u = index[i] + fa * (index[i + 1] - index[i])
        j = np.minimum(np.floor(u), n2 - 2).astype(int)
        fu = u - j
        dv = values[j + 1] - values[j]
        err = values[j] + fu * dv - target
        m = np.abs(err).max() + 1e-30
        r = np.abs(err) / m
        total = (r ** p).sum()
        g = np.sign(err) * r ** (p - 1) * total ** (1 / p - 1)   # d(p-norm)/d(output)
        g_values = np.bincount(j, g * (1 - fu), n2) + np.bincount(j + 1, g * fu, n2)
        g_u = g * dv
        g_index = np.bincount(i, g_u * (1 - fa), n1) + np.bincount(i + 1, g_u * fa, n1)
        suffix = np.cumsum(g_index[::-1])[::-1]                   # Σ_{k' >= k} g_index[k']
        g_w = (n2 - 1) / cum[-1] * suffix[1:] - (n2 - 1) / cum[-1] ** 2 * (g_index * cum).sum()
        return m * total ** (1 / p), np.concatenate([g_w * w, g_values])

    z = np.concatenate([np.log(np.maximum(np.diff(lut.index.astype(np.float64)), 1e-4)),
                        lut.values.astype(np.float64) / step])
    for p in powers:
        z = minimize(objective, z, args=(p,), jac=True, method="BFGS", options={"maxiter": iterations}).x
        _, _, index, values = unpack(z)
        yield DualLUT(lut.lo, lut.hi, index, values * step, lut.tails)


def _grid(lo: float, hi: float, points: int = 20001) -> np.ndarray:
    """A dense grid of float32-representable points (so references and tables see the same x)."""
    return np.linspace(lo, hi, points).astype(F32).astype(np.float64)


def _tail_term(x: np.ndarray, lut) -> np.ndarray:
    """What the tail term adds at x (zero inside the domain)."""
    c = np.clip(x, lut.lo, lut.hi)
    left, right = lut.tails
    return right * np.maximum(x - c, 0) - left * np.maximum(c - x, 0)


def _curvature_density(fn: Function, x: np.ndarray) -> np.ndarray:
    """ρ ∝ √|f''| (smoothed) plus a floor, so flat stretches still get some entries."""
    h = x[1] - x[0]
    y = fn(x)
    d2 = np.zeros_like(y)
    d2[1:-1] = (y[2:] - 2 * y[1:-1] + y[:-2]) / h ** 2
    d2[0], d2[-1] = d2[1], d2[-2]
    rho = _smooth(np.sqrt(np.abs(d2)), 33)
    return rho + 0.05 * rho.mean() + 1e-12


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return v
    kernel = np.ones(width) / width
    padded = np.pad(v, width // 2, mode="edge")
    return np.convolve(padded, kernel, mode="valid")[:len(v)]


def _dulut_from_density(fn: Function, lo: float, hi: float, n1: int, n2: int, fine: np.ndarray,
                        density: np.ndarray) -> DualLUT:
    """LUT1 = the warp G (cumulative density scaled to [0, N2-1]) on the uniform grid; LUT2 = f at
    the knots where the emitted, interpolated warp crosses each integer."""
    cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(fine))])
    warp = cum / cum[-1] * (n2 - 1)
    grid = np.linspace(lo, hi, n1)
    index = np.interp(grid, fine, warp)
    index[0], index[-1] = 0.0, n2 - 1
    index = np.maximum.accumulate(index)
    lut = DualLUT(lo, hi, index, np.zeros(n2), fn.tail_slopes())
    # knots of the piecewise-linear warp actually emitted (float32 LUT1, interpolated)
    knots = np.interp(np.arange(n2), lut.index.astype(np.float64), grid)
    lut.values = fn(knots).astype(F32)
    return lut


def _minimax_values(pos: np.ndarray, target: np.ndarray, n: int, start: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Table entries v minimising max |interp(pos; v) - target| (Lawson's iteratively reweighted
    least squares): the interpolated output is linear in v, weights (1 - frac) on v[j], frac on v[j+1]."""
    pos = np.asarray(pos, dtype=np.float64)
    j = np.minimum(np.floor(pos), n - 2).astype(int)
    frac = pos - j
    weights = np.full(len(pos), 1.0 / len(pos))
    start = np.asarray(start, dtype=np.float64)
    best_v, best_err = start, _interp_error(start, j, frac, target).max()
    for _ in range(iterations):
        w0, w1 = weights * (1 - frac), weights * frac
        ata = np.zeros((n, n))
        ata[np.diag_indices(n)] = np.bincount(j, w0 * (1 - frac), n) + np.bincount(j + 1, w1 * frac, n)
        off = np.bincount(j, w0 * frac, n)[:n - 1]
        ata[np.arange(n - 1), np.arange(1, n)] = off
        ata[np.arange(1, n), np.arange(n - 1)] = off
        atb = np.bincount(j, w0 * target, n) + np.bincount(j + 1, w1 * target, n)
        ata[np.diag_indices(n)] += 1e-15
        v = np.linalg.solve(ata, atb)
        err = _interp_error(v, j, frac, target)
        if err.max() < best_err:
            best_v, best_err = v, err.max()
        weights = weights * (err + 1e-12 * max(err.max(), 1e-30))
        weights /= weights.sum()
    return best_v.astype(F32)


def _interp_error(v, j, frac, target):
    """|emitted interpolation - target| with float32 entries and slopes, as the graph computes it."""
    v32 = np.asarray(v).astype(F32)
    s32 = np.append(np.diff(v32), F32(0)).astype(F32)
    return np.abs(v32[j].astype(np.float64) + frac * s32[j] - target)


def int8_table(fn: Function | str, scale: float, zero_point: int = 0) -> np.ndarray:
    """The exact table of an INT8 input: entry k = f((k - 128 - zero_point) · scale), k = 0..255."""
    fn = get_function(fn) if isinstance(fn, str) else fn
    codes = np.arange(-128, 128, dtype=np.float64)
    return fn((codes - zero_point) * np.float64(F32(scale))).astype(F32)


# --------------------------------------------------------------------------------------------
# Fidelity


@dataclass
class Fidelity:
    max_steps: float
    mean_steps: float
    step: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"max_steps": round(self.max_steps, 4), "mean_steps": round(self.mean_steps, 4),
                "output_step": self.step, "range": [self.lo, self.hi]}


def fidelity(table: Callable[[np.ndarray], np.ndarray], fn: Function | str, lo: float, hi: float,
             points: int = 20001) -> Fidelity:
    """Max and mean |table(x) - f(x)| over a dense grid of [lo, hi], in INT8 output steps."""
    fn = get_function(fn) if isinstance(fn, str) else fn
    x = _grid(lo, hi, points)
    step = output_step(fn, lo, hi)
    err = np.abs(np.asarray(table(x.astype(F32)), dtype=np.float64) - fn(x)) / step
    return Fidelity(float(err.max()), float(err.mean()), step, float(lo), float(hi))


def int8_fidelity(fn: Function | str, scale: float, table: np.ndarray | None = None) -> Fidelity:
    """Fidelity of the 256-entry table on the values an INT8 input can take (exact up to float32 rounding)."""
    fn = get_function(fn) if isinstance(fn, str) else fn
    table = int8_table(fn, scale) if table is None else table
    x = np.arange(-128, 128, dtype=np.float64) * np.float64(F32(scale))
    step = output_step(fn, x[0], x[-1])
    err = np.abs(table.astype(np.float64) - fn(x)) / step
    return Fidelity(float(err.max()), float(err.mean()), step, float(x[0]), float(x[-1]))


DEFAULT_RANGES = {  # input ranges of the function-level benchmark and tests
    "gelu": (-8.0, 8.0), "gelu_tanh": (-8.0, 8.0), "quick_gelu": (-8.0, 8.0), "silu": (-8.0, 8.0),
    "sigmoid": (-8.0, 8.0), "softplus": (-8.0, 8.0), "tanh": (-4.0, 4.0), "hardswish": (-8.0, 8.0),
    "hardsigmoid": (-8.0, 8.0), "exp": (-20.0, 0.0),
}
