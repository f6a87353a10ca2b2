"""Graph passes of onnxq, grouped by family (installed as onnxq.passes).

canonical/ (graph clean-up), cnn/, transformer/, petr/, nonlinear/ (lookup tables and integer-only
ops, with their maths), quant/ (the quantize step). onnxq.pipeline.registry names every pass and
imports its module only when a recipe runs it. Each module's docstring states the pass's kind
(exact / approximate / needs-retraining) and the algebra or the error bound behind it.
"""
