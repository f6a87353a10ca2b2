"""Reference PyTorch models and their ONNX export (installed as onnxq.models)."""
