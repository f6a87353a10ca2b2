"""Per-layer weight bit widths under an average-bits budget: the error estimates and the solver.

Every weight i of the linear layers (n_i values; layers that share a weight share its width) gets b_i from the candidate widths so that Σ n_i·b_i / Σ n_i stays
within the budget and the estimated output error Σ e_i(b_i) is small. Two estimates of e_i(b):

* LUQ (entropy): e_i(b) = H_i · 4^(−b), where H_i is the entropy (bits) of layer i's output values on
  calibration data (a 256-bin histogram per batch, averaged). 4^(−b) is how the noise power of a b-bit
  grid falls with b; H_i says how much the layer's output carries: layers with low-entropy outputs tolerate
  fewer bits (LUQ), and the allocation ranks layers by H_i alone.
* sensitivity: e_i(b) measured, the relative squared error of the model's outputs when layer i alone has
  its weights quantized to b bits (all others float), on a few calibration batches.

The solver treats this as a multiple-choice knapsack and solves it by dynamic programming over the budget
(in a few thousand units): a greedy upgrade order, cheapest error per bit first, strands the largest layers at
the narrowest width when their upgrade no longer fits. Widths: 2, 3 and 4 bits are stored in INT4 (opset
21), 6 and 8 bits in INT8, all on the symmetric grids TensorRT's weights use (2 bits: −1, 0, +1 steps).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.quant.qdq import INT4_WEIGHT, INT8_WEIGHT, IntFormat

WIDTHS = (2, 3, 4, 6, 8)


def weight_format(bits: int) -> IntFormat:
    """The symmetric integer grid of `bits`-bit weights, in the narrowest ONNX type that holds it."""
    if bits not in WIDTHS:
        raise ValueError(f"weight bits {bits}: choose from {', '.join(map(str, WIDTHS))}")
    if bits == 8:
        return INT8_WEIGHT
    if bits == 4:
        return INT4_WEIGHT
    top = 2 ** (bits - 1) - 1
    return IntFormat((INT4_WEIGHT if bits < 4 else INT8_WEIGHT).dtype, -top, top)


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]  # layer name -> width
    average: float  # parameter-weighted mean width
    estimated_error: float  # Σ e_i(b_i) under the estimate used


def allocate(sizes: Mapping[str, int], errors: Mapping[str, Mapping[int, float]], budget: float,
             widths: Sequence[int] = WIDTHS, max_units: int = 200_000) -> Allocation:
    """Widths per layer within `budget` average bits that minimise Σ errors[layer][width].

    A multiple-choice knapsack solved by dynamic programming over the bits spent above the narrowest width.
    They are counted exactly, in units of the largest number that divides every layer's size (layer shapes
    share large factors), unless that needs more than `max_units` units; then each layer's cost is rounded up
    to coarser units, so the plan still never exceeds the budget."""
    widths = sorted(widths)
    names, total = list(sizes), sum(sizes.values())
    if budget < widths[0]:
        raise ValueError(f"a budget of {budget} bits is below the narrowest width ({widths[0]})")
    spare = (budget - widths[0]) * total
    unit = float(np.gcd.reduce([int(n) for n in sizes.values()]))
    if spare / unit > max_units:
        unit = spare / max_units
    resolution = int(np.floor(spare / unit + 1e-9))
    best = np.zeros(resolution + 1)  # least error of the layers so far within j units
    choices = []
    for name in names:
        options = np.full((len(widths), resolution + 1), np.inf)
        for k, b in enumerate(widths):
            cost = int(np.ceil(sizes[name] * (b - widths[0]) / unit - 1e-9))
            if cost <= resolution:
                options[k, cost:] = best[:resolution + 1 - cost] + errors[name][b]
        choices.append(np.argmin(options, axis=0))
        best = options.min(axis=0)
    bits, j = {}, resolution
    for name, choice in zip(reversed(names), reversed(choices)):
        b = widths[int(choice[j])]
        bits[name] = b
        j -= int(np.ceil(sizes[name] * (b - widths[0]) / unit - 1e-9))
    bits = {name: bits[name] for name in names}
    average = sum(sizes[n] * b for n, b in bits.items()) / total
    return Allocation(bits, average, float(sum(errors[n][b] for n, b in bits.items())))


def entropy_errors(entropies: Mapping[str, float], widths: Sequence[int] = WIDTHS) -> dict[str, dict[int, float]]:
    """LUQ's estimate: e_i(b) = H_i · 4^(−b)."""
    return {name: {b: h * 4.0 ** -b for b in widths} for name, h in entropies.items()}


class OutputEntropy:
    """Mean over batches of the entropy (bits) of each tensor's values in a 256-bin histogram."""

    BINS = 256

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.sums = dict.fromkeys(self.names, 0.0)
        self.batches = 0

    def update(self, values: dict[str, np.ndarray]) -> None:
        for name in self.names:
            x = np.asarray(values[name], dtype=np.float32).reshape(-1)
            x = x[np.isfinite(x)]
            if x.size == 0 or x.min() == x.max():
                continue  # a constant tensor carries nothing: entropy 0
            counts, _ = np.histogram(x, bins=self.BINS)
            p = counts[counts > 0] / x.size
            self.sums[name] += float(-(p * np.log2(p)).sum())
        self.batches += 1

    def entropies(self) -> dict[str, float]:
        return {name: total / max(self.batches, 1) for name, total in self.sums.items()}


def measure_sensitivity(model: ir.Model, weights: Sequence[str], quantized, feeds: list,
                        widths: Sequence[int] = WIDTHS, progress=lambda items, **_: items) -> dict[str, dict[int, float]]:
    """e_i(b): relative squared error of all outputs when weight i (an initializer name) alone is
    `quantized(name, array, b)` in every linear layer that reads it.

    One ONNX Runtime session serves every trial: the weights become graph inputs (in a copy of the model),
    so a trial feeds one quantized weight and the others as they are. A weight that other ops read too (an
    embedding table tied to the LM head) is copied for its linear readers first: the trial quantizes it there only."""
    from onnxq.ir.graph import Namer, add_initializer, const_array
    from onnxq.runtime.session import session

    copy = model.clone()
    namer = Namer(copy.graph)
    inputs, arrays = {}, {}
    for name in weights:
        value = copy.graph.initializers[name]
        readers = [(node, i) for node, i in value.uses() if node.op_type in ("MatMul", "Gemm") and i == 1]
        if len(readers) < len(value.uses()):
            value = add_initializer(copy.graph, namer, f"{name}_linear", const_array(value).copy())
            for node, i in readers:
                node.replace_input_with(i, value)
        arrays[name] = const_array(value).copy()
        copy.graph.initializers.pop(value.name)
        value.const_value = None
        copy.graph.inputs.append(value)
        inputs[name] = value.name
    sess = session(copy)
    weight_feed = {inputs[n]: a for n, a in arrays.items()}
    references = [sess.run(None, {**feed, **weight_feed}) for feed in feeds]
    energy = sum(float(np.sum(np.square(y, dtype=np.float64))) for ys in references for y in ys) or 1.0
    errors = {}
    for name in progress(list(weights), desc="allocate_bits: sensitivity", unit="weight"):
        errors[name] = {}
        for b in widths:
            trial = {**weight_feed, inputs[name]: quantized(name, arrays[name], b)}
            diff = sum(float(np.sum(np.square(y - r, dtype=np.float64)))
                       for feed, ref in zip(feeds, references) for y, r in zip(sess.run(None, {**feed, **trial}), ref))
            errors[name][b] = diff / energy
    return errors


def read_errors(path: str, key: str, layers: Sequence[str], widths: Sequence[int]) -> dict[str, dict[int, float]] | None:
    """The errors stored at `path` if they were measured under `key` (the model's weights and the scheme) and
    cover every layer at every width (None otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("key") != key:
            return None
        errors = {name: {int(b): float(e) for b, e in stored["errors"][name].items()} for name in layers}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return errors if all(set(widths) <= set(e) for e in errors.values()) else None


def write_errors(path: str, key: str, errors: Mapping[str, Mapping[int, float]]) -> None:
    """Store measured errors as JSON, atomically (a temporary file in the same folder, then renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
        json.dump({"key": key, "errors": {name: {str(b): e for b, e in row.items()} for name, row in errors.items()}},
                  f, indent=0)
    os.replace(f.name, path)
