"""Reference PyTorch models and their ONNX export (the onnxq-models distribution, imported as onnxq_models)."""
