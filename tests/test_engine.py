"""TensorRT engine building: runs wherever the tensorrt package imports (not on our CI machines)."""

import onnx
import pytest

from builders import mobilenet_block_model, random_images
from onnxq import quantize

trt = pytest.importorskip("tensorrt")


@pytest.mark.tensorrt
def test_strongly_typed_int8_engine(tmp_path):
    from onnxq.runtime.tensorrt import build_engine

    qmodel = quantize(mobilenet_block_model(batch=1), {"input": random_images(16)}, show_progress=False)
    path = tmp_path / "m.int8.onnx"
    onnx.save(qmodel, path)
    precisions = build_engine(path, tmp_path / "m.plan")
    assert (tmp_path / "m.plan").stat().st_size > 0
    assert any("Int8" in k or "INT8" in k.upper() for k in precisions), precisions
