"""onnxq: an ONNX graph-rewriting INT8 quantizer for TensorRT and ONNX Runtime.

    import onnxq
    qmodel = onnxq.quantize("model.onnx", "calib.npz", output="model.int8.onnx")
    onnxq.export(torch_module, example_inputs, "model.onnx")  # PyTorch to ONNX, checked in ONNX Runtime

Plain quantization needs only onnx, onnxruntime, onnxscript and numpy; torch is imported by the
passes that optimise something (learned rounding, rotations) and only when they run.
"""

from onnxq._version import __version__
from onnxq.api import quantize, report
from onnxq.torch_export import export

__all__ = ["__version__", "export", "quantize", "report"]
