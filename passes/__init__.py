"""Graph passes of onnxq, one module per pass (installed as onnxq.passes)."""
