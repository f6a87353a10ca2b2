"""onnxq: ONNX graph-rewriting INT8 quantizer."""
