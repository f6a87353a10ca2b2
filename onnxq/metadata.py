"""Every metadata key onnxq writes, in one place.

Model-level keys (metadata_props of the model) record what ran; node-level keys (metadata_props of
a node) say how a node was treated. Netron shows both; `onnxq inspect` reads them back.
"""

# model level
VERSION = "onnxq.version"
RECIPE = "onnxq.recipe"
TARGET = "onnxq.target"
PASSES = "onnxq.passes"  # JSON list of pass records
PASS_LINE_PREFIX = "onnxq.pass."  # one readable line per pass: onnxq.pass.NN.name
FIDELITY = "onnxq.fidelity"  # JSON list: measured error of each lookup table / integer op

# node level
QUANTIZED = "onnxq.quantized"
FLOAT_REASON = "onnxq.float_reason"
REPLACEMENT = "onnxq.replacement"
INPUT_ROTATED = "onnxq.input_rotated"
BIAS_CORRECTED = "onnxq.bias_corrected"
RANGE_MARGIN = "onnxq.range_margin"
