"""The all-MiniLM-L6-v2 task the benchmarks share: its calibration set and its quality measure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class MiniLMTask:
    """FP32 model, calibration feeds (wiki sentences plus single words, none an evaluation word),
    held-out sentences and the FP32 embeddings of them that `quality` compares against."""

    fp32: Path
    calib: dict[str, np.ndarray] = field(repr=False)
    sentences: list[str] = field(repr=False)
    reference: np.ndarray = field(repr=False)

    def quality(self, path: str | Path) -> dict[str, float]:
        """Spearman on WordSim-353 and SimLex-999, and the mean cosine to the FP32 sentence embeddings."""
        from onnxq.runtime.session import session
        from onnxq_models import minilm

        return minilm.quality(session(path), self.sentences, self.reference)


def minilm_task(quick: bool, dynamo: bool = False) -> MiniLMTask:
    """dynamo: the model as torch.onnx's dynamo exporter writes it, instead of the TorchScript export."""
    from onnxq.runtime.session import session
    from onnxq_models import minilm, text_data

    fp32 = minilm.cached_onnx(dynamo=True) if dynamo else minilm.cached_onnx()
    calib = minilm.calibration_feeds(32 if quick else 96, 48 if quick else 160)
    sentences = text_data.wiki_sentences("eval")[: 64 if quick else 300]
    return MiniLMTask(fp32, calib, sentences, minilm.embed(session(fp32), sentences, max_length=32))
