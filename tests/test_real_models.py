"""Real pretrained models end to end (marked slow: run with `pytest -m slow`, and by the benchmarks)."""

import numpy as np
import pytest

from conftest import assert_lint_clean, run
from onnxq import quantize

pytestmark = pytest.mark.slow


def test_mobilenet_v2_photos():
    from onnxq_models import images, mobilenet_v2

    fp32 = mobilenet_v2.cached_onnx()
    evaluation = images.crops("eval", 100)
    for per_tensor, floor in ((False, 0.8), (True, 0.7)):
        qmodel = quantize(fp32, {"input": images.crops("calib", 64)}, per_tensor=per_tensor, show_progress=False)
        assert_lint_clean(qmodel)
        ref, out = run(fp32, {"input": evaluation})[0], run(qmodel, {"input": evaluation})[0]
        assert np.mean(ref.argmax(1) == out.argmax(1)) > floor


def test_ppocr_detector_with_weights_in_constant_nodes():
    import onnx

    from onnxq_models import ppocr

    path = ppocr.det_model_path()
    assert not onnx.load(path).graph.initializer  # every weight is a Constant node
    qmodel = quantize(path, {"x": ppocr.text_images(8, seed=0)}, show_progress=False)
    assert_lint_clean(qmodel)
    feed = {"x": ppocr.text_images(2, seed=1)}
    ref, out = run(path, feed)[0], run(qmodel, feed)[0]
    cosine = np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out)
    assert out.shape == ref.shape and cosine > 0.7
