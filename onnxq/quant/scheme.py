"""The quantization scheme: how weights and activations will be stored, in one frozen object.

The pipeline derives it from the recipe's quantize step (and the user's overrides) before any pass
runs and hands it to every pass in the context, so passes that prepare for quantization (equalize,
smooth) choose their scales for the format the quantize step will really use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantScheme:
    weights: str = "per-channel"  # per-channel | per-tensor
    weight_bits: int = 8
    activation_bits: int = 8
    block_size: int = 0  # > 0: blocked weights along the input axis
    calibrator: str = "percentile"
    weight_calibrator: str = "mse"
    rounding: str = "nearest"
    target: str = "tensorrt"

    @property
    def per_channel(self) -> bool:
        return self.weights == "per-channel"

    @classmethod
    def of(cls, quantize_step, target: str) -> QuantScheme:
        """The scheme a quantize step's options describe (the default scheme when there is none)."""
        if quantize_step is None:
            return cls(target=target)
        return cls(**{name: getattr(quantize_step, name) for name in
                      ("weights", "weight_bits", "activation_bits", "block_size", "calibrator", "weight_calibrator",
                       "rounding")}, target=target)
