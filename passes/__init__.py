"""Graph passes of onnxq, one module per pass (installed as onnxq.passes).

Importing this package registers every pass with the pipeline, so recipes can name them. Each
module's docstring states the pass's kind (exact / approximate / needs-retraining) and the algebra
or the error bound behind it.
"""

from onnxq.passes import (  # noqa: F401  (imported for registration)
    dulut,
    equalize,
    fold_batchnorm,
    fold_constants,
    fold_norm,
    fold_position_bias,
    integer_ops,
    klt_rotate,
    lift_constants,
    pe_fold,
    petr_pe,
    qans,
    qfpe,
    quantize,
    recentre,
    rotate,
    smooth,
    split_range,
    upgrade_opset,
)
