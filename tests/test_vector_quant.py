"""RWKVQuant's scalar/vector proxy and the importance-weighted k-means codebooks (onnxq.quant.vector_quant)."""

import numpy as np
import pytest

from onnxq.quant.vector_quant import (
    Codebook,
    Proxy,
    activation_importance,
    assign_with_feedback,
    fit_codebook,
    hessian_importance,
    proxy,
    quantize_codewords,
    thresholds_for_share,
    with_quantized_codewords,
)


def weighted_error(weight, book, importance=None):
    diff = (book.reconstruct().astype(np.float64) - weight) ** 2
    return float(np.sum(diff if importance is None else importance * diff))


def uniform_scalar_error(weight, bits):
    """Squared error of the best per-tensor uniform min-max grid with 2^bits levels (clip range searched)."""
    lo, hi = float(weight.min()), float(weight.max())
    best = np.inf
    for shrink in np.linspace(0.5, 1.0, 26):  # MSE-optimal clipping: a strong scalar baseline
        a, b = lo * shrink, hi * shrink
        step = (b - a) / (2**bits - 1)
        q = np.clip(np.round((weight - a) / step), 0, 2**bits - 1) * step + a
        best = min(best, float(np.sum((q - weight) ** 2)))
    return best


def clustered_weight(rows=256, cols=128, clusters=48, seed=0):
    """A Gaussian mixture of 2-vectors: tight clusters around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 2))
    pick = rng.integers(clusters, size=rows * cols // 2)
    return (centres[pick] + 0.02 * rng.normal(size=(pick.size, 2))).reshape(rows, cols).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# proxy


def test_evenly_spaced_values_score_zero():
    p = proxy(np.linspace(-1.0, 1.0, 4097))
    assert abs(p.coarse) < 1e-9
    assert abs(p.fine) < 1e-9
    assert p.choice(1e-6, 1e-6) == "scalar"


def test_gaussian_is_less_uniform_than_uniform_random():
    rng = np.random.default_rng(0)
    gauss = proxy(rng.normal(size=(128, 256)))
    unif = proxy(rng.uniform(-1.0, 1.0, size=(128, 256)))
    assert gauss.coarse > 1.5 * unif.coarse
    assert gauss.fine > 3.0 * unif.fine


def test_outliers_raise_the_fine_proxy():
    rng = np.random.default_rng(1)
    weight = rng.uniform(-1.0, 1.0, size=(64, 128))
    with_outliers = weight.copy()
    with_outliers.flat[[5, 500, 5000]] = [8.0, -12.0, 20.0]
    clean, dirty = proxy(weight), proxy(with_outliers)
    assert dirty.fine > 100 * clean.fine
    assert dirty.choice(clean.coarse * 10, clean.fine * 10) == "vector"


def test_thresholds_for_share_splits_half():
    proxies = [Proxy(0.9, 40.0), Proxy(0.1, 2.0), Proxy(0.5, 3.0), Proxy(0.6, 30.0)]  # rank sums 6, 0, 2, 4
    tc, tf = thresholds_for_share(proxies, 0.5)
    choices = [p.choice(tc, tf) for p in proxies]
    assert choices.count("vector") == 2
    assert choices == ["vector", "scalar", "scalar", "vector"]  # the two with the highest rank sums


def test_thresholds_for_share_extremes():
    proxies = [Proxy(0.2 * i, float(i)) for i in range(5)]
    for share, vectors in [(0.0, 0), (1.0, 5), (0.4, 2)]:
        tc, tf = thresholds_for_share(proxies, share)
        assert [p.choice(tc, tf) for p in proxies].count("vector") == vectors


# ---------------------------------------------------------------------------------------------------------
# fit_codebook


def test_few_distinct_vectors_reconstruct_exactly():
    rng = np.random.default_rng(2)
    distinct = rng.normal(size=(16, 4)).astype(np.float32)
    weight = distinct[rng.integers(16, size=300)].reshape(30, 40)
    book = fit_codebook(weight, dim=4, entries=16)
    np.testing.assert_array_equal(book.reconstruct(), weight)
    assert book.reconstruct().dtype == np.float32
    assert book.values.shape == (16, 4)


def test_kmeans_beats_its_seeding_and_4bit_scalar_on_clustered_weight():
    weight = clustered_weight()
    seeded = fit_codebook(weight, dim=2, entries=256, iterations=0)
    fitted = fit_codebook(weight, dim=2, entries=256)
    assert fitted.bits_per_weight(codeword_bits=0) == pytest.approx(4.0 + 32 / weight.size)
    assert fitted.indices.dtype == np.uint8
    vq = weighted_error(weight, fitted)
    assert vq < weighted_error(weight, seeded)
    assert vq < 0.1 * uniform_scalar_error(weight.astype(np.float64), bits=4)


def test_importance_protects_the_heavy_rows():
    rng = np.random.default_rng(3)
    # the heavy rows are narrow and the light ones wide: without importance most codewords go to the wide rows
    weight = (rng.normal(size=(64, 32)) * np.where(np.arange(64) < 32, 0.2, 1.0)[:, None]).astype(np.float32)
    diag = np.where(np.arange(64) < 32, 100.0, 1.0)
    importance = hessian_importance(diag, weight.shape)
    plain = fit_codebook(weight, dim=2, entries=16, seed=0)
    weighted = fit_codebook(weight, dim=2, entries=16, importance=importance, seed=0)
    heavy = slice(0, 32)
    err_plain = np.sum((plain.reconstruct()[heavy] - weight[heavy]) ** 2)
    err_weighted = np.sum((weighted.reconstruct()[heavy] - weight[heavy]) ** 2)
    assert err_weighted < 0.5 * err_plain


def test_index_dtype_follows_codebook_size():
    weight = np.random.default_rng(4).normal(size=(40, 40)).astype(np.float32)
    assert fit_codebook(weight, dim=2, entries=256, iterations=2).indices.dtype == np.uint8
    assert fit_codebook(weight, dim=2, entries=300, iterations=2).indices.dtype == np.uint16


def test_bits_per_weight_small_case():
    book = Codebook(values=np.zeros((4, 2), np.float32), indices=np.zeros(16, np.uint8), dim=2, shape=(4, 8))
    # 16 indices x 2 bits + 4 codewords x 2 x 8 bits + 32-bit scale = 128 bits over 32 weights
    assert book.bits_per_weight() == 4.0
    assert book.bits_per_weight(codeword_bits=16) == 6.0


def test_last_axis_must_divide_by_dim():
    with pytest.raises(ValueError, match="not divisible"):
        fit_codebook(np.zeros((4, 7), np.float32), dim=2, entries=4)


def test_vectors_run_along_the_last_axis_of_any_rank():
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(3, 5, 8)).astype(np.float32)
    book = fit_codebook(weight, dim=4, entries=4)
    assert book.indices.shape == (30,)
    assert book.reconstruct().shape == weight.shape
    # each reconstructed group of 4 along the last axis is one codeword
    groups = book.reconstruct().reshape(-1, 4)
    np.testing.assert_array_equal(groups, book.values[book.indices])


def test_activation_importance_broadcasts_channels():
    h = activation_importance(np.array([1.0, 2.0, 3.0]), (2, 3))
    np.testing.assert_array_equal(h, [[1, 2, 3], [1, 2, 3]])
    h = hessian_importance(np.array([1.0, 2.0]), (2, 3))
    np.testing.assert_array_equal(h, [[1, 1, 1], [2, 2, 2]])


# ---------------------------------------------------------------------------------------------------------
# integer codewords


def test_quantized_codewords_stay_in_range_and_close():
    weight = clustered_weight(rows=64, cols=64, seed=6)
    book = fit_codebook(weight, dim=2, entries=64)
    q, scale = quantize_codewords(book)
    assert q.dtype == np.int8 and q.shape == book.values.shape
    assert q.min() >= -127 and q.max() <= 127
    assert np.abs(q).max() == 127  # the largest codeword sets the scale
    assert scale == pytest.approx(np.abs(book.values).max() / 127, rel=1e-6)
    quantized = with_quantized_codewords(book)
    diff = np.abs(quantized.reconstruct() - book.reconstruct())
    assert diff.max() <= scale / 2 * (1 + 1e-5)  # float32 rounding of q·scale
    q4, _ = quantize_codewords(book, bits=4)
    assert q4.min() >= -7 and q4.max() <= 7


def test_all_zero_codewords_get_unit_scale():
    book = fit_codebook(np.zeros((2, 4), np.float32), dim=2, entries=2)
    q, scale = quantize_codewords(book)
    assert scale == 1.0 and not q.any()


def test_feedback_assignment_lowers_the_layer_output_error():
    """GPTVQ's row-by-row assignment under H = E[xᵀx]: on correlated inputs the output error ‖X(W − Ŵ)‖²
    falls below that of assigning every vector on its own, with the same codewords."""
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(32, 32))
    x = rng.normal(size=(2048, 32)) @ mix  # strongly correlated input channels
    weight = rng.normal(size=(32, 64)).astype(np.float32)
    book = fit_codebook(weight, dim=2, entries=16, seed=0)
    hessian = x.T @ x / len(x)
    fed = assign_with_feedback(weight, book, hessian)
    assert fed.indices.dtype == book.indices.dtype and fed.values is book.values

    def output_error(b):
        return float(np.square(x @ (weight - b.reconstruct())).mean())

    assert output_error(fed) < 0.8 * output_error(book)
    with pytest.raises(ValueError, match="do not match"):
        assign_with_feedback(weight, book, hessian[:8, :8])


def test_reassignment_after_rounding_never_costs_accuracy():
    """Rounding codewords to int8 moves them; choosing each vector's nearest rounded codeword afresh can only
    lower the (weighted) error against keeping the fitted indices."""
    rng = np.random.default_rng(3)
    weight = (rng.standard_t(3, size=(128, 64)) * 0.05).astype(np.float32)  # heavy tails: wide codebook range
    importance = np.abs(rng.normal(size=weight.shape)).astype(np.float32)
    book = fit_codebook(weight, dim=2, entries=256, importance=importance)
    kept = with_quantized_codewords(book, bits=8)
    fresh = with_quantized_codewords(book, bits=8, reassign=(weight, importance))
    np.testing.assert_array_equal(kept.values, fresh.values)

    def error(b):
        return float((importance * (weight - b.reconstruct()) ** 2).sum())

    assert error(fresh) <= error(kept) and not np.array_equal(fresh.indices, kept.indices)
