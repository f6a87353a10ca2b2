"""GPTQ rounding: lower layer output error than round-to-nearest at the same scales, end to end too."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import attention_model, mobilenet_block_model, random_images
from conftest import assert_lint_clean, run, sqnr_db
from onnxq import quantize
from onnxq.quant import gptq
from onnxq.quant.qdq import INT4_WEIGHT, INT8_WEIGHT, quantize_weight

torch = pytest.importorskip("torch")


def _reader(op: str, weight_shape, **attrs) -> ir.Node:
    return ir.node(op, [ir.Value(name="x"), ir.Value(name="w", shape=ir.Shape(weight_shape))], attrs)


def _rel(out, ref) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("fmt", [INT8_WEIGHT, INT4_WEIGHT], ids=["int8", "int4"])
def test_matmul_output_error_drops_on_held_out_inputs(fmt):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))  # correlated input channels, as real activations have
    x_fit, x_held = rng.normal(size=(2000, 64)) @ mixing, rng.normal(size=(500, 64)) @ mixing
    w = rng.normal(size=(64, 32)).astype(np.float32)
    nearest, scale = quantize_weight(w, 1, fmt, "max")
    rounded = gptq.gptq_round(w, scale, x_fit.T @ x_fit, fmt, _reader("MatMul", w.shape))
    assert rounded.dtype == nearest.dtype and rounded.shape == w.shape
    assert fmt.qmin <= rounded.min() and rounded.max() <= fmt.qmax
    err_nearest = _rel(x_held @ (nearest * scale), x_held @ w)
    err_gptq = _rel(x_held @ (rounded * scale), x_held @ w)
    assert err_gptq < 0.85 * err_nearest, (err_gptq, err_nearest)


def test_activation_order_rounds_the_costly_inputs_first():
    """Inputs whose mean square grows with their index: in index order the costliest inputs are rounded
    last, with nothing left to absorb their error; act-order rounds them first. The held-out output error
    is lower, and the integers come back in the weight's own layout (the permutation undone)."""
    rng = np.random.default_rng(4)
    gains = np.geomspace(0.05, 5.0, 64)
    mixing = rng.normal(size=(64, 64)) * 0.3 + np.eye(64)
    x_fit, x_held = (rng.normal(size=(n, 64)) @ mixing * gains for n in (3000, 800))
    w = rng.normal(size=(64, 48)).astype(np.float32)
    _, scale = quantize_weight(w, 1, INT4_WEIGHT, "max")
    reader = _reader("MatMul", w.shape)
    errors = {}
    for order in ("natural", "activation"):
        q = gptq.gptq_round(w, scale, x_fit.T @ x_fit, INT4_WEIGHT, reader, order=order)
        errors[order] = _rel(x_held @ (q * scale), x_held @ w)
    assert errors["activation"] < 0.9 * errors["natural"], errors
    # act-order is index order on the inputs sorted by Σx²: permuting the problem by hand gives the same
    # integers, permuted (the inverse permutation is applied on the way out)
    h = x_fit.T @ x_fit
    by_cost = np.argsort(-np.diag(h), kind="stable")
    assert not np.array_equal(by_cost, np.arange(64))
    by_hand = gptq.gptq_round(w[by_cost], scale, h[np.ix_(by_cost, by_cost)], INT4_WEIGHT, reader, order="natural")
    np.testing.assert_array_equal(gptq.gptq_round(w, scale, h, INT4_WEIGHT, reader, order="activation")[by_cost],
                                  by_hand)


@pytest.mark.parametrize("split", [False, True], ids=["one_hessian", "held_out_damping"])
def test_output_channels_in_row_blocks_give_the_integers_of_one_block(monkeypatch, split):
    """GPTQ's rows are independent under one H: rounding an LM head's rows a block at a time (to bound
    its float64 copies) changes no integer, with the damping search as without."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 48)) @ rng.normal(size=(48, 48))
    w = rng.normal(size=(48, 1000)).astype(np.float32)  # MatMul: 1000 output channels
    _, scale = quantize_weight(w, 1, INT4_WEIGHT, "max")
    hessian = gptq.SplitHessian(x[:300].T @ x[:300], x[300:].T @ x[300:]) if split else x.T @ x
    whole = gptq.gptq_round(w, scale, hessian, INT4_WEIGHT, _reader("MatMul", w.shape))
    monkeypatch.setattr(gptq, "ROW_BLOCK", 96)  # 11 blocks, the last one short
    blocked = gptq.gptq_round(w, scale, hessian, INT4_WEIGHT, _reader("MatMul", w.shape))
    np.testing.assert_array_equal(blocked, whole)
    assert np.any(whole != quantize_weight(w, 1, INT4_WEIGHT, "max")[0])  # GPTQ, not round-to-nearest


def test_conv_rows_reproduce_the_convolution_and_error_drops():
    rng = np.random.default_rng(1)
    x = torch.nn.functional.conv2d(torch.randn(4, 8, 12, 12), torch.randn(8, 8, 3, 3), padding=1).relu()
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    node = _reader("Conv", w.shape, pads=[1, 0, 1, 2], strides=[2, 1])  # asymmetric padding, strided
    reference = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), torch.from_numpy(w), stride=(2, 1))
    rows = gptq._input_rows(node, x, torch)
    n, c, h, wd = reference.shape
    from_rows = (rows @ torch.from_numpy(w).reshape(16, -1).T).reshape(n, h, wd, c).permute(0, 3, 1, 2)
    assert float((from_rows - reference).abs().max()) < 1e-4 * float(reference.abs().max())

    nearest, scale = quantize_weight(w, 0, INT4_WEIGHT, "max")
    hessian = (rows.double().T @ rows.double()).numpy()
    rounded = gptq.gptq_round(w, scale[:, None, None, None], hessian, INT4_WEIGHT, node)
    errors = []
    for q in (nearest, rounded):
        dequantized = torch.from_numpy(q.astype(np.float32) * scale[:, None, None, None])
        out = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), dequantized, stride=(2, 1))
        errors.append(float((out - reference).norm() / reference.norm()))
    assert errors[1] < 0.9 * errors[0], errors


@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_with_gptq_is_closer_to_fp32(seed):
    model = mobilenet_block_model(channels=16, seed=seed)
    calib, held_out = {"input": random_images(32, seed=1)}, {"input": random_images(8, seed=2)}
    reference = run(model, held_out)[0]
    sqnr = {}
    for rounding in ("nearest", "gptq"):
        steps = ["fold_batchnorm", {"upgrade_opset": {"opset": 21}},
                 {"quantize": {"weight_bits": 4, "calibrator": "max", "rounding": rounding}}]
        qmodel = quantize(model, calib, recipe=steps, show_progress=False, log=lambda *_: None)
        assert_lint_clean(qmodel)
        sqnr[rounding] = sqnr_db(reference, run(qmodel, held_out)[0])
    assert sqnr["gptq"] > sqnr["nearest"] + 1.0, sqnr


def test_blocked_int4_matmuls_with_gptq_are_closer_to_fp32():
    model = attention_model(hidden=64, heads=4, seq=16)
    mixing = np.random.default_rng(3).normal(size=(64, 64)) / 8  # correlated hidden channels

    def feeds(n, seed):
        hidden = np.random.default_rng(seed).normal(size=(n, 16, 64)) @ mixing
        return {"hidden": hidden.astype(np.float32), "attention_mask": np.ones((n, 16), np.int64)}

    calib, held_out = feeds(64, 1), feeds(16, 2)
    reference = run(model, held_out)[0]
    sqnr = {}
    for rounding in ("nearest", "gptq"):
        steps = [{"upgrade_opset": {"opset": 21}},
                 {"quantize": {"weight_bits": 4, "block_size": 16, "calibrator": "max", "rounding": rounding}}]
        qmodel = quantize(model, calib, recipe=steps, show_progress=False, log=lambda *_: None)
        sqnr[rounding] = sqnr_db(reference, run(qmodel, held_out)[0])
    assert sqnr["gptq"] > sqnr["nearest"] + 1.0, sqnr


def test_gptq_order_reaches_the_rounding():
    """The quantize step's gptq_order is the order GPTQ rounds in: natural and activation order give
    different integers on a model whose inputs differ in scale, both lint clean."""
    model = attention_model(hidden=64, heads=4, seq=16)
    gains = np.geomspace(0.1, 10.0, 64)[np.random.default_rng(4).permutation(64)]
    hidden = np.random.default_rng(1).normal(size=(64, 16, 64)) * gains
    calib = {"hidden": hidden.astype(np.float32), "attention_mask": np.ones((64, 16), np.int64)}
    weights = {}
    for order in ("natural", "activation"):
        steps = [{"upgrade_opset": {"opset": 21}},
                 {"quantize": {"weight_bits": 4, "block_size": 16, "calibrator": "max", "rounding": "gptq",
                               "gptq_order": order}}]
        qmodel = quantize(model, calib, recipe=steps, show_progress=False, log=lambda *_: None)
        assert_lint_clean(qmodel)
        weights[order] = {t.name: onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer
                          if t.data_type == onnx.TensorProto.INT4}
    assert weights["natural"].keys() == weights["activation"].keys() and weights["natural"]
    assert any(not np.array_equal(weights["natural"][k], weights["activation"][k]) for k in weights["natural"])


def test_bad_rounding_is_refused():
    with pytest.raises(Exception, match="rounding.*is not one of"):
        quantize(mobilenet_block_model(), {"input": random_images(2)}, recipe=[{"quantize": {"rounding": "stochastic"}}],
                 show_progress=False)


TESTS = Path(__file__).parent


def _with_tests_on_path() -> dict[str, str]:
    """The environment for a child Python that imports the test builders (as pytest's pythonpath does here)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env


def test_plain_quantization_does_not_import_torch():
    code = ("import sys; from builders import attention_model, mobilenet_block_model, random_images; "
            "from onnxq import quantize; quantize(mobilenet_block_model(), {'input': random_images(4)}, show_progress=False, "
            "log=lambda *_: None); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS.parent, env=_with_tests_on_path())


def _output_error(x, w, q, scale) -> float:
    return float(np.linalg.norm(x @ (q * scale) - x @ w) ** 2)


@pytest.mark.parametrize("rows", [60, 1000])
def test_damping_chosen_on_held_out_batches_generalises(rows):
    """Few calibration rows for 128 inputs: GPTQ at the paper's damping fits H's noise and ends worse than
    round-to-nearest on new inputs; many rows: it wins. The split H picks the right damping in both."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(128, 128))
    x, x_new = rng.normal(size=(rows, 128)) @ mixing, rng.normal(size=(3000, 128)) @ mixing
    w = rng.standard_t(3, size=(128, 32)).astype(np.float32)
    nearest, scale = quantize_weight(w, None, INT8_WEIGHT, "mse")
    step, node = np.broadcast_to(scale, w.shape), _reader("MatMul", w.shape)
    new_error = {"nearest": _output_error(x_new, w, nearest, scale)}
    for damping in gptq.DAMPINGS:
        new_error[damping] = _output_error(x_new, w, gptq.gptq_round(w, step, x.T @ x, INT8_WEIGHT, node, (damping,)), scale)
    split = gptq.SplitHessian(x[0::2].T @ x[0::2], x[1::2].T @ x[1::2])
    chosen = _output_error(x_new, w, gptq.gptq_round(w, step, split, INT8_WEIGHT, node), scale)
    if rows == 60:
        assert new_error[0.01] > new_error["nearest"], new_error
    assert chosen <= 1.001 * min(new_error.values()), (chosen, new_error)


def test_gptq_without_torch_rounds_to_nearest_and_says_so():
    """torch is optional: a recipe asking for GPTQ still runs, rounds to nearest and logs why."""
    code = ("import sys; sys.modules['torch'] = None; import numpy as np; "
            "from builders import mobilenet_block_model, random_images; from onnxq import quantize; "
            "from conftest import run; lines = []; calib = {'input': random_images(8)}; "
            "steps = lambda r: [{'quantize': {'calibrator': 'max', 'rounding': r}}]; "
            "a = quantize(mobilenet_block_model(), calib, recipe=steps('gptq'), show_progress=False, log=lines.append); "
            "b = quantize(mobilenet_block_model(), calib, recipe=steps('nearest'), show_progress=False, log=lambda *_: None); "
            "assert any('GPTQ rounding needs torch' in line for line in lines), lines; "
            "probe = {'input': random_images(2, seed=5)}; assert np.array_equal(run(a, probe)[0], run(b, probe)[0])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS.parent, env=_with_tests_on_path())


@pytest.mark.parametrize(("pending_rows", "thin_rows"), [(1, 64), (7, 64), (10**9, 64), (7, 1)],
                         ids=["each-batch", "some-batches", "all-at-the-end", "thick-batches-at-once"])
def test_hessian_sums_are_the_inputs_gram_matrices_by_batch_parity(monkeypatch, pending_rows, thin_rows):
    """H is gathered from several thin batches' rows per product (thick ones are added at once); the sums
    are XᵀX of the even and of the odd batches however many rows go into one product."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxq.ir.modelio import load_model
    from onnxq.stats.service import observe

    monkeypatch.setattr(gptq, "PENDING_ROWS", pending_rows)
    monkeypatch.setattr(gptq, "THIN_ROWS", thin_rows)
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")])
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    batches = [{"x": rng.normal(size=(2, 5, 8)).astype(np.float32)} for _ in range(9)]
    node = next(n for n in model.graph if n.op_type == "MatMul")
    observer = gptq.HessianObserver({"w": [node]})
    observe(model, batches, observer, desc="H", show_progress=False)
    split = observer.hessians({"w": [node]})["w"]
    rows = [b["x"].reshape(-1, 8).astype(np.float64) for b in batches]
    np.testing.assert_allclose(split.fit, sum(r.T @ r for r in rows[0::2]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(split.check, sum(r.T @ r for r in rows[1::2]), rtol=1e-5, atol=1e-4)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    h = x.T @ x
    h[:, 7] = h[7, :] = 0.0  # an input that was never non-zero
    u = gptq._inverse_factor(torch.from_numpy(h), 0.1).numpy()
    assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    live = h.copy()
    live[7, 7] = 1.0
    live += 0.1 * np.mean(np.diag(live)) * np.eye(40)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(live), rtol=1e-9, atol=1e-12)
