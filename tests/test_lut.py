"""onnxq.passes.nonlinear.lut: DULUT construction and fidelity, in INT8 output steps (pure NumPy, no graphs)."""

import numpy as np
import pytest

from onnxq.passes.nonlinear.lut import (
    DEFAULT_RANGES,
    FUNCTIONS,
    build_dulut,
    build_uniform,
    fidelity,
    int8_fidelity,
    int8_table,
    output_step,
    table_domain,
)

ISSUE_FUNCTIONS = ["gelu", "gelu_tanh", "silu", "sigmoid", "softplus", "tanh", "hardswish", "exp"]


@pytest.mark.parametrize("name", ISSUE_FUNCTIONS)
def test_dulut_32_32_below_one_output_step(name):
    lo, hi = DEFAULT_RANGES[name]
    lut = build_dulut(name, lo, hi, (32, 32))
    fid = fidelity(lut, name, lo, hi)
    assert lut.entries == 64
    assert fid.max_steps < 0.25, fid  # measured 0.02-0.12; the issue asks for < 1
    assert fid.mean_steps < fid.max_steps
    # LUT1 is a monotone map of the grid onto [0, N2 - 1]
    assert lut.index[0] == 0 and abs(lut.index[-1] - 31) < 1e-4 and np.all(np.diff(lut.index) >= 0)
    # the error-driven refinement is what gets it there: the curvature warp alone is far worse
    assert lut.history[0] > 1.5 * fid.max_steps


@pytest.mark.parametrize("name, lo, hi", [("gelu", -14.0, 6.5), ("silu", -3.0, 25.0), ("sigmoid", -30.0, 2.0),
                                          ("exp", -40.0, 0.0), ("exp", -6.0, 3.0), ("softplus", -2.0, 2.0)])
def test_dulut_on_calibration_like_ranges(name, lo, hi):
    lut = build_dulut(name, lo, hi)
    assert fidelity(lut, name, lo, hi).max_steps < 0.5


def test_dulut_beats_uniform_64_on_exp():
    lo, hi = DEFAULT_RANGES["exp"]
    dulut = fidelity(build_dulut("exp", lo, hi, (32, 32)), "exp", lo, hi)
    uniform64 = fidelity(build_uniform("exp", lo, hi, 64), "exp", lo, hi)
    uniform64_plain = fidelity(build_uniform("exp", lo, hi, 64, fit=False), "exp", lo, hi)
    assert dulut.max_steps < 0.5 * uniform64.max_steps < uniform64_plain.max_steps


def test_uniform_256_is_the_fine_reference():
    for name in ("gelu", "exp", "sigmoid"):
        lo, hi = DEFAULT_RANGES[name]
        assert fidelity(build_uniform(name, lo, hi, 256), name, lo, hi).max_steps < 0.05


def test_tails_follow_the_asymptotes():
    lut = build_dulut("gelu", -20.0, 20.0)
    assert lut.hi < 6 and lut.lo > -6  # the table covers only where GELU bends
    x = np.array([-50.0, -20.0, 8.0, 20.0, 100.0], np.float32)
    np.testing.assert_allclose(lut(x), FUNCTIONS["gelu"](x.astype(np.float64)), atol=0.05 * output_step(FUNCTIONS["gelu"], -20, 20))
    sig = build_dulut("sigmoid", -40.0, 40.0)
    np.testing.assert_allclose(sig(np.array([-1e4, 1e4], np.float32)), [0.0, 1.0], atol=1e-3)


def test_table_domain_keeps_curved_part():
    lo, hi = table_domain(FUNCTIONS["exp"], -100.0, 0.0)
    assert hi == 0.0 and -12 < lo < -8


def test_int8_table_is_exact_per_code():
    scale = 8.0 / 127
    table = int8_table("silu", scale)
    codes = np.arange(-128, 128)
    np.testing.assert_allclose(table, FUNCTIONS["silu"](codes * np.float64(np.float32(scale))), rtol=1e-6, atol=1e-7)
    assert int8_fidelity("silu", scale).max_steps < 1e-3


def test_output_step_definition():
    assert output_step(FUNCTIONS["sigmoid"], -8, 8) == pytest.approx((FUNCTIONS["sigmoid"](8.0) - FUNCTIONS["sigmoid"](-8.0)) / 255)
    assert output_step(FUNCTIONS["exp"], -20, 0) == pytest.approx((1 - np.exp(-20)) / 255)
