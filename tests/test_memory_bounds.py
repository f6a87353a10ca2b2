"""Memory bounds of the weight-side computations: results unchanged, temporaries bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxq.quant import qdq


def _unchunked_mse_amax(w, amax, reduce_axes, fmt, steps=40):
    """The clipping search in one piece over the whole weight (the definition the chunked search keeps)."""
    best_amax, best_err = amax, None
    for ratio in np.linspace(0.5, 1.0, steps):
        candidate = amax * ratio
        scale = np.where(candidate > 0, candidate / fmt.qmax, 1.0)
        err = ((np.clip(np.round(w / scale), fmt.qmin, fmt.qmax) * scale - w) ** 2).sum(
            axis=reduce_axes, keepdims=reduce_axes is not None)
        if best_err is None:
            best_amax, best_err = candidate, err
        else:
            better = err < best_err
            best_amax, best_err = np.where(better, candidate, best_amax), np.where(better, err, best_err)
    return best_amax


@pytest.mark.parametrize("shape, axis", [((300, 200), 1), ((300, 200), 0), ((64, 3, 3, 3), 0), ((96, 512), 1)])
@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_chunked_mse_clipping_is_bit_identical_per_channel(shape, axis, chunk):
    w = np.random.default_rng(0).standard_t(3, size=shape).astype(np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes, keepdims=True)
    expected = _unchunked_mse_amax(w, amax, reduce_axes, qdq.INT8_WEIGHT)
    got = qdq._mse_weight_amax(w, amax, reduce_axes, qdq.INT8_WEIGHT, chunk_elements=chunk)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_chunked_mse_clipping_per_tensor_matches_to_float_noise():
    w = np.random.default_rng(1).standard_t(3, size=(400, 300)).astype(np.float32)
    amax = np.abs(w).max()
    expected = _unchunked_mse_amax(w, amax, None, qdq.INT8_WEIGHT)
    got = qdq._mse_weight_amax(w, amax, None, qdq.INT8_WEIGHT, chunk_elements=5000)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < amax


def test_mse_weight_quantization_temporaries_stay_below_the_weight_size():
    # 8M float32 weights (32 MB): the search in one piece made several float64 copies of the weight
    w = np.random.default_rng(2).standard_normal((2048, 4096), dtype=np.float32)
    tracemalloc.start()
    try:
        q, scale = qdq.quantize_weight(w, 1, method="mse")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert q.shape == w.shape and scale.shape == (4096,)
    # the int8 result (w.nbytes / 4) and the float32 copy quantize_weight makes, plus bounded search blocks
    assert peak < 1.5 * w.nbytes


def _attention_readers():
    import onnx_ir as ir

    from builders import attention_model
    from onnxq.stats.calib_data import load_calibration

    model = ir.from_proto(attention_model(seq=8, hidden=16, heads=2))
    readers = {n.inputs[1].name: [n] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()}
    rng = np.random.default_rng(3)
    data = load_calibration({"hidden": rng.standard_normal((6, 8, 16)).astype(np.float32),
                             "attention_mask": np.ones((6, 8), np.int64)}, model)
    return model, readers, data


def test_hessians_collected_in_groups_equal_one_pass_and_ignore_later_edits():
    pytest.importorskip("torch")
    import onnx_ir as ir

    from onnxq.quant import gptq

    model, readers, data = _attention_readers()
    whole = gptq.collect_hessians(model, readers, data, show_progress=False)
    expected = {key: whole.pop(key) for key in readers}
    assert whole.passes == 1 and len(expected) == 4  # query/key/value share one input matrix, output has its own

    one_matrix = 2 * 4 * 16 * 16  # both parities of a 16 x 16 float32 H
    grouped = gptq.collect_hessians(model, readers, data, show_progress=False, budget_bytes=one_matrix)
    assert grouped.groups == [["query.weight", "key.weight", "value.weight"], ["output.weight"]]
    first = grouped.pop("query.weight")
    # an edit after the first group (as quantize makes: weights replaced) must not reach the later passes
    zeros = ir.Value(name="zeros", const_value=ir.tensor(np.zeros((16, 16), np.float32), name="zeros"))
    model.graph.register_initializer(zeros)
    for node in model.graph:
        if node.name == "query/MatMul":
            node.replace_input_with(1, zeros)
    got = {"query.weight": first, **{key: grouped.pop(key) for key in ("key.weight", "value.weight", "output.weight")}}
    assert grouped.passes == 2 and len(grouped.held) == 0
    for key, h in expected.items():
        np.testing.assert_array_equal(got[key].fit, h.fit)
        np.testing.assert_array_equal(got[key].check, h.check)
    assert np.any(got["output.weight"].fit)
