"""Names of the metadata onnxq writes into models: one place, so writers and readers agree.

Model metadata (`model.metadata_props`) records what onnxq did; node metadata
(`node.metadata_props`) marks single nodes for later passes and for `onnxq inspect`.
"""

# model metadata
VERSION_KEY = "onnxq.version"      # the onnxq version that wrote the model
RECIPE_KEY = "onnxq.recipe"        # the recipe's name
RECIPE_REASON_KEY = "onnxq.recipe_reason"  # why that recipe: picked automatically (and why) or named by the user
TARGET_KEY = "onnxq.target"        # the deployment target
PASSES_KEY = "onnxq.passes"        # JSON list: one record per pass run (name, kind, options, summary)
FIDELITY_KEY = "onnxq.fidelity"    # JSON list: one fidelity entry per replaced nonlinear op

# node metadata
REPLACEMENT_KEY = "onnxq.replacement"      # which original op(s) an emitted node replaces
QUANTIZED_KEY = "onnxq.quantized"          # how quantize stored the node's inputs
FLOAT_REASON_KEY = "onnxq.float_reason"    # why quantize kept an input in float
CORRECTED_KEY = "onnxq.bias_corrected"     # the mean output shift bias correction removed
INPUT_ROTATED_KEY = "onnxq.input_rotated"  # a linear layer whose input rotate rotated (smooth leaves it alone)
WEIGHT_BITS_KEY = "onnxq.weight_bits"      # the width allocate_bits chose for this node's weight (quantize stores it so)
CODEBOOK_KEY = "onnxq.codebook"            # a DequantizeLinear of a vq_weights codebook weight (written before quantize)
SOURCE_NAME_KEY = "onnxq.source_name"      # the generic name a node had before the pipeline renamed it (--exclude matches it)
KEEP_FLOAT_KEY = "onnxq.keep_float"        # an earlier pass asks quantize to keep this node in float; the value says why
RANGE_MARGIN_KEY = "onnxq.range_margin"    # widen this node's output range by the factor given (split_range, ort-cpu MaxPool → quantize)
PE_KEY = "onnxq.petr_pe"          # a PETR position-embedding node, or the Add of the PE to the image features
PASS_LINE_PREFIX = "onnxq.pass."  # model metadata: one readable line per pass run, onnxq.pass.NN.name
