"""Weights rounded several at a time (onnxq.quant.weight_rounding) give exactly the integers and scales of
rounding them one by one, in the order given; an error in one weight reaches the caller."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.errors import OnnxqError
from onnxq.quant import gptq
from onnxq.quant.qdq import INT4_WEIGHT, INT8_WEIGHT, quantize_weight
from onnxq.quant.weight_rounding import WeightJob, in_order, round_weights

pytest.importorskip("torch")


def _matmul_reader(d_in: int, d_out: int) -> ir.Node:
    x = ir.Value(name="x", shape=ir.Shape([4, d_in]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([d_in, d_out]), type=ir.TensorType(ir.DataType.FLOAT))
    return ir.Node("", "MatMul", [x, w], name="mm")


def _jobs(seed: int = 0) -> list[WeightJob]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i, (d_in, d_out) in enumerate([(48, 32), (32, 64), (64, 16), (24, 24), (40, 8)]):
        array = (rng.standard_normal((d_in, d_out)) * rng.uniform(0.2, 3, d_out)).astype(np.float32)
        x = rng.standard_normal((800, d_in)).astype(np.float32) * rng.uniform(0.1, 4, d_in).astype(np.float32)
        half = len(x) // 2
        hessian = gptq.SplitHessian(x[:half].T @ x[:half], x[half:].T @ x[half:]) if i % 2 == 0 else None
        jobs.append(WeightJob(f"w{i}", array, 1 if i != 3 else None, 0, hessian, _matmul_reader(d_in, d_out)))
    return jobs


@pytest.mark.parametrize("fmt, calibrator", [(INT8_WEIGHT, "max"), (INT4_WEIGHT, "mse")])
def test_threads_give_the_sequential_integers_in_order(fmt, calibrator):
    one = list(round_weights(_jobs(), fmt, calibrator, gptq.DAMPINGS, workers=1))
    three = list(round_weights(_jobs(), fmt, calibrator, gptq.DAMPINGS, workers=3))
    assert [job.name for job, _, _ in three] == [f"w{i}" for i in range(5)]
    for (_, q1, s1), (_, q3, s3) in zip(one, three):
        assert q1.dtype == q3.dtype == fmt.numpy
        np.testing.assert_array_equal(q1, q3)
        np.testing.assert_array_equal(s1, s3)
    # GPTQ did act: its integers differ from round-to-nearest at the same scale on the Hessian jobs
    nearest = list(round_weights([WeightJob(j.name, j.array, j.axis, j.block) for j in _jobs()], fmt, calibrator,
                                 gptq.DAMPINGS, workers=1))
    assert any(not np.array_equal(q, n) for (job, q, _), (_, n, _) in zip(one, nearest) if job.hessian is not None)


def test_in_order_runs_concurrently_draws_lazily_and_keeps_order():
    active, peak, drawn = [0], [0], []
    lock = threading.Lock()

    def slow_square(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02 * (5 - i % 5))  # later items finish first
        with lock:
            active[0] -= 1
        return i * i

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    results = in_order(slow_square, items(), workers=3)
    assert next(results) == 0
    assert len(drawn) <= 4  # no more than `workers` in flight, one drawn ahead
    assert [0, *results] == [i * i for i in range(10)]
    assert peak[0] >= 2


def test_an_error_in_one_weight_reaches_the_caller():
    bad = WeightJob("nan", np.array([[1.0, np.nan], [0.5, 2.0]], dtype=np.float32), 1, 0)
    jobs = [*_jobs()[:2], bad, *_jobs()[2:]]
    with pytest.raises(OnnxqError, match="NaN"):
        list(round_weights(jobs, INT8_WEIGHT, "max", gptq.DAMPINGS, workers=2))


def test_blocked_jobs_with_a_hessian_clip_each_block_by_its_inputs():
    """A blocked INT4 weight with GPTQ statistics gets the scales of an mse search weighted by diag H (what
    each input's error costs the output), not of the unweighted search."""
    rng = np.random.default_rng(7)
    array = rng.standard_t(4, size=(64, 24)).astype(np.float32)
    x = rng.standard_normal((512, 64)) * np.geomspace(0.01, 10.0, 64)[rng.permutation(64)]
    hessian = gptq.SplitHessian((x[:256].T @ x[:256]).astype(np.float32), (x[256:].T @ x[256:]).astype(np.float32))
    job = WeightJob("w", array, 1, 16, hessian, _matmul_reader(64, 24))
    (_, _, scale), = round_weights([job], INT4_WEIGHT, "mse", gptq.DAMPINGS, workers=1)
    weighted = quantize_weight(array, 1, INT4_WEIGHT, "mse", 16, gptq.input_square_sums(hessian))[1]
    unweighted = quantize_weight(array, 1, INT4_WEIGHT, "mse", 16)[1]
    np.testing.assert_array_equal(scale, weighted)
    assert not np.array_equal(scale, unweighted)
