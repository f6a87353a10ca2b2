"""The benchmarks' test splits: text no design choice was measured on must not overlap the dev windows."""

import numpy as np
import pytest


def test_smollm2_test_windows_share_no_window_with_any_dev_window_set():
    smollm2 = pytest.importorskip("onnxq_models.smollm2")
    try:
        test = smollm2.test_windows(32)
    except (ImportError, FileNotFoundError) as exc:  # the tokenizer's package is not installed
        pytest.skip(f"SmolLM2's tokenizer is not available: {exc}")
    dev = {tuple(row) for n in smollm2.DEV_COUNTS for row in smollm2.eval_windows(n)}  # every dev set used
    assert test.shape == (32, smollm2.SEQ_LEN) and len({tuple(r) for r in test}) == 32
    assert not dev & {tuple(row) for row in test}
    with pytest.raises(ValueError, match="left outside the dev windows"):
        smollm2.test_windows(10**6)
    assert np.array_equal(test, smollm2.test_windows(32))  # deterministic
