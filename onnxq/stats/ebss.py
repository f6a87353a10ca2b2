"""EBSS: an expert-balanced calibration set, sampled from a mixture-of-experts LM itself.

Calibration text routes most tokens to a few experts, so rarely chosen experts are calibrated on a
handful of tokens. Expert-balanced self-sampling (after MoEQuant, ICML 2025) generates the set with
the model instead: a beam search whose score trades the text's likelihood under the model against
how evenly the tokens so far spread over the experts. This module's formulation:

* Seeds. Sequence i starts from one token sampled (at temperature τ, from `seed`'s generator) from
  the model's next-token distribution after a one-token primer. The primers are a seeded shuffle of
  the vocabulary (of the ASCII letters for a vocabulary of 256, taken to be bytes), so sequences
  start in different contexts; the primer itself is not part of the sequence. First tokens are drawn
  without replacement across sequences (until the vocabulary is used up): the search after them is
  deterministic, so two sequences with one first token would be one sequence twice. The whole set is
  a function of `seed`.
* One step. One ONNX Runtime run on the w beams of every sequence together (ids [sequences·w, t])
  gives (a) log p(next token) at the last position, from log-softmax(logits / τ), and (b) the
  routing of every token so far: token → expert e in a layer when the expert's gate is > 0 (the
  gates are exposed as extra graph outputs; onnxq.analysis.moe finds them).
* Candidates are (beam, token) pairs among each beam's top-w tokens, scored

      score = logp(beam) + log p(token | beam) − λ · t · imbalance(beam)

  where logp(beam) is the beam's cumulative log-probability, t its length, and imbalance the
  standard deviation of the beam's per-expert token shares divided by its value when every token
  goes to the same top-k experts, averaged over the MoE layers: 0 when balanced, 1 when collapsed.
  The factor t makes λ a cost in nats per token: a fully collapsed routing costs λ nats per token,
  on the same scale as the log-probability it is traded against, at every length. The top w
  candidates of each sequence become its beams; at the first step only one beam exists.
* The new token's routing is only known at the next step (it comes out of the run that also scores
  its successor), so all candidates of one beam share its penalty: balance chooses between beams,
  with a one-step delay, and the likelihood chooses the tokens.
* At the end one more run routes the last tokens; each sequence keeps its best-scoring beam.

λ (`balance_weight`) defaults to BALANCE_WEIGHT = 4 nats per token at full collapse. On
onnxq_models.moe_lm (16 × 128 tokens, w = 4, τ = 1.2), raising λ from 0 to 4 cut the share std
about threefold and left the text fluent (the model's own loss on it went from 0.49 to 0.9 bits per
byte; its calibration text scores 2.1); past 4 the balance hardly improved while the text fell apart
(1.15 bits at 8, gibberish at 16). Balance can only pick among the beams the top-w tokens make: an
expert that no likely token reaches stays short whatever λ is.

The model is an LM with one int64 input [batch, sequence] and logits [batch, sequence, vocab] as
its first output. A fixed sequence axis is handled by padding every prefix to it: in a causal model
padding after position t leaves positions ≤ t unchanged, and only those are read. A fixed batch axis
is handled by running rows in chunks of that size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.progress import progress

BALANCE_WEIGHT = 4.0  # nats per token that a fully collapsed routing costs (see the module docstring)
_PAD = 0  # token filling a fixed sequence axis past the prefix: a causal model never reads it
_LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8).astype(np.int64)


@dataclass
class EBSSResult:
    """The generated set: ids [sequences, length], the model input they feed, and the tokens each
    expert received over the whole set, [moe_layers, experts]."""

    ids: np.ndarray
    input_name: str
    coverage: np.ndarray
    layers: tuple[str, ...] = ()  # the MoE layers' router names, in coverage's row order

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz keyed by the input name (what `onnxq quantize --calib` reads), atomically."""
        from onnxq.ir.outputs import write_atomically

        if Path(path).suffix != ".npz":
            raise OnnxqError(f"{path}: calibration file must end in .npz")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **{self.input_name: self.ids})

        return write_atomically(path, write)


def build_ebss(model: str | os.PathLike | ir.Model, *, sequences: int, length: int, width: int = 4,
               temperature: float = 1.2, balance_weight: float = BALANCE_WEIGHT, seed: int = 0,
               show_progress: bool = True) -> EBSSResult:
    """Generate `sequences` × `length` calibration ids from `model` by expert-balanced beam search
    (see the module docstring)."""
    for name, value in (("sequences", sequences), ("length", length), ("width", width), ("seed", seed)):
        _check_int(name, value, minimum=0 if name == "seed" else 1)
    _check_float("temperature", temperature, positive=True)
    _check_float("balance_weight", balance_weight, positive=False)
    runner = _Runner(model)
    runner.check_length(length)
    rng = np.random.default_rng(seed)
    first = _seed_tokens(runner, sequences, temperature, rng)
    search = _BeamSearch(runner, first, width, temperature, balance_weight)
    for _ in progress(range(1, length), desc="ebss: generate", unit="token", disable=not show_progress):
        search.step()
    ids, coverage = search.finish()
    return EBSSResult(ids, runner.input_name, coverage, runner.layer_names)


def expert_coverage(model: str | os.PathLike | ir.Model, ids: np.ndarray, input_name: str | None = None,
                    batch_size: int = 8) -> np.ndarray:
    """Tokens routed to each expert of each MoE layer, [moe_layers, experts], over calibration `ids`
    [samples, sequence] (any set: EBSS output, text windows), run `batch_size` rows at a time."""
    _check_int("batch_size", batch_size, minimum=1)
    runner = _Runner(model)
    if input_name is not None and input_name != runner.input_name:
        raise OnnxqError(f"the model's input is '{runner.input_name}', not '{input_name}'")
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise OnnxqError(f"calibration ids must be a non-empty 2-D integer array [samples, sequence], "
                         f"not {ids.dtype}{list(ids.shape)}")
    runner.check_length(ids.shape[1])
    total = np.zeros(runner.coverage_shape, dtype=np.int64)
    for start in range(0, len(ids), batch_size):
        _, counts = runner.run(ids[start:start + batch_size].astype(np.int64), logits=False)
        total += counts.sum(0)
    return total


def share_std(coverage: np.ndarray) -> np.ndarray:
    """Per MoE layer, the standard deviation of the experts' shares of the routed tokens (0: even)."""
    coverage = np.asarray(coverage, dtype=np.float64)
    return (coverage / np.maximum(coverage.sum(-1, keepdims=True), 1)).std(-1)


def collapsed_std(experts: int, top_k: int) -> float:
    """share_std of a layer sending every token to the same top_k of its experts."""
    return float(share_std(np.array([1] * top_k + [0] * (experts - top_k)))[()])


class _Runner:
    """One ORT session over the LM with every expert gate exposed; runs id batches of any shape the
    model accepts (padding to a fixed sequence axis, chunking to a fixed batch axis)."""

    def __init__(self, model: str | os.PathLike | ir.Model):
        from onnxq.analysis.structure import analyse
        from onnxq.ir.modelio import load_model
        from onnxq.runtime.session import exposing, session

        model = load_model(model)
        self.input_name, self.fixed_batch, self.fixed_length = _lm_input(model)
        self.logits_name = _lm_output(model)
        moes = analyse(model).moes
        if not moes:
            raise OnnxqError("no mixture-of-experts layer found in the model (a router linear → TopK whose "
                             "gates weigh summed expert MLPs); EBSS balances experts, so it needs one")
        experts = {len(moe.experts) for moe in moes}
        if len(experts) != 1:
            raise OnnxqError(f"MoE layers with different expert counts ({sorted(experts)}) are not supported")
        self.gates = [[e.gate.name for e in moe.experts] for moe in moes]
        self.layer_names = tuple(moe.name for moe in moes)
        self.top_k = [moe.top_k or 1 for moe in moes]
        self.coverage_shape = (len(moes), experts.pop())
        self.session = session(exposing(model, [g for layer in self.gates for g in layer]))

    def check_length(self, length: int) -> None:
        if self.fixed_length is not None and length > self.fixed_length:
            raise OnnxqError(f"length {length} is beyond the model's fixed sequence axis of {self.fixed_length}")

    def run(self, ids: np.ndarray, *, logits: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """(logits at the last position [rows, vocab] or None, routed token counts [rows, layers, experts])."""
        rows, t = ids.shape
        last, counts = [], []
        for chunk in self._chunks(ids):
            outs = self.session.run([self.logits_name, *(g for layer in self.gates for g in layer)],
                                    {self.input_name: chunk})
            if logits:
                last.append(_last_logits(outs[0], t))
            # a gate is [batch, sequence, 1] (or [batch·sequence, 1], as some exporters flatten tokens)
            routed = np.stack([o.reshape(len(chunk), -1)[:, :t] > 0 for o in outs[1:]], axis=-1)
            counts.append(routed.sum(1).reshape(len(chunk), *self.coverage_shape))
        counts = np.concatenate(counts)[:rows]
        return (np.concatenate(last)[:rows] if logits else None), counts.astype(np.int64)

    def _chunks(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        if self.fixed_length is not None and ids.shape[1] < self.fixed_length:
            ids = np.pad(ids, ((0, 0), (0, self.fixed_length - ids.shape[1])), constant_values=_PAD)
        if self.fixed_batch is None:
            yield ids
            return
        for start in range(0, len(ids), self.fixed_batch):
            chunk = ids[start:start + self.fixed_batch]
            if len(chunk) < self.fixed_batch:  # fill the last chunk with copies; their rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - len(chunk), 0)])
            yield chunk


def _lm_input(model: ir.Model) -> tuple[str, int | None, int | None]:
    """(name, fixed batch or None, fixed sequence length or None) of the LM's one integer input."""
    from onnxq.stats.calib_data import model_inputs

    specs = model_inputs(model)
    if len(specs) != 1:
        raise OnnxqError(f"EBSS needs a language model with one input (token ids [batch, sequence]); this one "
                         f"has {len(specs)}: {[s.describe() for s in specs]}")
    spec = specs[0]
    if spec.dtype != np.int64 or len(spec.dims) != 2:
        raise OnnxqError(f"EBSS needs a language model whose input is int64 token ids [batch, sequence]; "
                         f"this one takes {spec.describe()}")
    return spec.name, spec.dims[0], spec.dims[1]


def _lm_output(model: ir.Model) -> str:
    out = model.graph.outputs[0] if model.graph.outputs else None
    if out is None or (out.shape is not None and len(out.shape) != 3):
        raise OnnxqError("EBSS needs a language model whose first output is logits [batch, sequence, vocab]; "
                         f"this one's is {'missing' if out is None else f'{out.name} of shape {out.shape}'}")
    return out.name


def _last_logits(logits: np.ndarray, t: int) -> np.ndarray:
    if logits.ndim != 3 or logits.shape[1] < t:
        raise OnnxqError(f"EBSS needs logits [batch, sequence, vocab] from the model's first output; it gave "
                         f"shape {list(logits.shape)} for {t} tokens")
    return logits[:, t - 1].astype(np.float64)


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _seed_tokens(runner: _Runner, sequences: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Each sequence's first token: sampled after a primer token, distinct across sequences while the
    vocabulary lasts (see the module docstring)."""
    probe, _ = runner.run(np.zeros((1, 1), dtype=np.int64))
    vocab = probe.shape[-1]
    pool = _LETTERS if vocab == 256 else np.arange(vocab, dtype=np.int64)
    primers = np.concatenate([rng.permutation(pool) for _ in range(-(-sequences // len(pool)))])[:sequences]
    logp, _ = runner.run(primers[:, None])
    probs = np.exp(_log_softmax(logp, temperature))
    first, used = np.empty(sequences, dtype=np.int64), np.zeros(vocab, dtype=bool)
    for i in range(sequences):
        free = np.where(used, 0.0, probs[i])
        if free.sum() <= 0:  # every likely token taken: start over
            used[:] = False
            free = probs[i]
        first[i] = _draw(free, rng.random())
        used[first[i]] = True
    return first


def _draw(weights: np.ndarray, u: float) -> int:
    """Inverse-CDF sampling with one uniform u in [0, 1): reproducible from the seed alone."""
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(weights) - 1))


def _top(logp: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k most likely tokens, most likely first (ties: lower id first); a partition, not a sort
    of the whole vocabulary."""
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(logp, part, -1)), axis=-1)
    return np.take_along_axis(part, order, -1)


class _BeamSearch:
    """The beams of every sequence, [sequences, width, t] ids with their cumulative log-probabilities."""

    def __init__(self, runner: _Runner, first: np.ndarray, width: int, temperature: float, weight: float):
        self.runner, self.width, self.temperature, self.weight = runner, width, temperature, weight
        self.ids = np.repeat(first[:, None, None], width, axis=1)
        self.logp = np.full((len(first), width), -np.inf)
        self.logp[:, 0] = 0.0  # the beams start as copies of one: only the first may extend
        scale = [collapsed_std(runner.coverage_shape[1], k) for k in runner.top_k]
        self.collapsed = np.array(scale)

    def step(self) -> None:
        s, w, t = self.ids.shape
        logits, counts = self.runner.run(self.ids.reshape(s * w, t))
        token_logp = _log_softmax(logits, self.temperature)
        top = _top(token_logp, min(w, token_logp.shape[-1]))
        k = top.shape[-1]
        beam_score = self.logp - self._penalty(counts).reshape(s, w)
        cand = (beam_score.reshape(s * w, 1) + np.take_along_axis(token_logp, top, -1)).reshape(s, w * k)
        keep = np.argsort(-cand, axis=-1, kind="stable")[:, :w]
        beam, slot = keep // k, keep % k
        rows = np.arange(s)[:, None]
        tokens = top.reshape(s, w, k)[rows, beam, slot]
        self.logp = self.logp[rows, beam] + token_logp.reshape(s, w, -1)[rows, beam, tokens]
        self.ids = np.concatenate([self.ids[rows, beam], tokens[..., None]], axis=-1)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The best beam of each sequence, with the expert coverage of those beams."""
        s, w, t = self.ids.shape
        _, counts = self.runner.run(self.ids.reshape(s * w, t), logits=False)
        score = self.logp - self._penalty(counts).reshape(s, w)
        best = np.argmax(score, axis=-1)  # first maximum: deterministic
        chosen = counts.reshape(s, w, *counts.shape[1:])[np.arange(s), best]
        return self.ids[np.arange(s), best], chosen.sum(0)

    def _penalty(self, counts: np.ndarray) -> np.ndarray:
        """λ · t · imbalance per row, from routed counts [rows, layers, experts] (see the module docstring)."""
        imbalance = (share_std(counts) / self.collapsed).mean(-1)
        return self.weight * self.ids.shape[-1] * imbalance


def _check_int(name: str, value, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise OnnxqTypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise OnnxqValueError(f"{name} must be at least {minimum}, not {value}")


def _check_float(name: str, value, *, positive: bool) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise OnnxqTypeError(f"{name} must be a number, not {type(value).__name__}")
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise OnnxqValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, not {value}")
