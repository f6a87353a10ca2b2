"""Orthogonal rotations folded into weights (used by rotate and klt_rotate): the matrices, the checks
that a site can be rotated exactly, and the rewrites. The algebra of each site is in rotate.py.

Hadamard matrices: Sylvester for powers of two, Paley I/II for orders 12, 20, 28, 36, 44, …, and
Kronecker products of the two (576 = 36·16, 1536 = 12·128, 384 = 12·32); a random orthogonal matrix
where no Hadamard matrix is built. Random ±1 row signs (R = D·H) make each rotation random.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxq.analysis import structure as st
from onnxq.analysis.matching import last_dim
from onnxq.ir.graph import Namer, add_initializer, const_array, mark_changed, private_weight, replace_initializer
from onnxq.ir.linear import set_bias, set_weight_io
from onnxq.metadata import INPUT_ROTATED_KEY
from onnxq.passes.transformer.norm_folding import fold, linear_readers

# ----------------------------------------------------------------------------------------------------
# checks


def stream_problem(s: st.Structure) -> str | None:
    """Why the residual stream of `s` cannot be rotated exactly (None: it can)."""
    stream = s.stream
    if stream is None:
        return "no residual stream found (no token embedding Gather feeding residual Adds)"
    if stream.problems:
        return stream.problems[0]
    if not stream.adds:
        return "no residual Adds on the stream"
    for norm in stream.norms:
        if norm.kind == "rms" and norm.form not in ("decomposed", "RMSNormalization", "SimplifiedLayerNormalization"):
            return f"norm '{norm.name}' of form {norm.form} is not handled"
    return None


def head_problem(att: st.Attention) -> str | None:
    if att.o is None:
        return "no output projection found after the attention"
    if not att.v_path_plain:
        return "V reaches the attention MatMul through ops other than reshapes/transposes"
    if att.o_path and not all(n.op_type in ("Transpose", "Reshape", "Identity", "Cast", "Dropout") for n in att.o_path):
        return "the attention output reaches the output projection through other ops"
    return None


# ----------------------------------------------------------------------------------------------------
# orthogonal matrices


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(order: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of `order` by Paley's constructions, or None."""
    def quadratic_character(q):
        residues = {(i * i) % q for i in range(1, q)}
        idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
        table = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
        return table[idx]

    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I
        s = np.zeros((order, order))
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, quadratic_character(q)
        return np.eye(order) + s
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        c = np.zeros((q + 1, q + 1))
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, quadratic_character(q)
        return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1), [[1, -1], [-1, -1]])
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A normalised (orthogonal) Hadamard matrix of size n, or None when none is constructed here."""
    if n < 1:
        return None
    for m in range(1, n + 1):
        if n % m or (n // m) & (n // m - 1):
            continue  # n/m must be a power of two
        base = np.ones((1, 1)) if m == 1 else (np.array([[1, 1], [1, -1]]) if m == 2 else _paley(m))
        if base is None:
            continue
        h = np.kron(base, _sylvester(n // m))
        if np.allclose(h @ h.T, n * np.eye(n)):
            return h / math.sqrt(n)
    return None


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def orthogonal(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """R = D·H (random signs times a Hadamard matrix), or a random orthogonal matrix."""
    if kind == "hadamard":
        h = hadamard(n)
        if h is not None:
            return rng.choice([-1.0, 1.0], size=n)[:, None] * h
    return random_orthogonal(n, rng)


def klt(c: np.ndarray) -> np.ndarray:
    """Orthonormal eigenvectors of the symmetric matrix c, as columns, largest eigenvalue first."""
    c = (c + c.T) / 2
    values, vectors = np.linalg.eigh(c)
    k = vectors[:, np.argsort(values)[::-1]]
    q, r = np.linalg.qr(k)  # re-orthonormalise (Gram–Schmidt) against round-off
    return q * np.sign(np.diag(r))


def ones_fixing_rotation(n: int, rng: np.random.Generator) -> np.ndarray:
    """An orthogonal R with R·1 = 1: P·diag(1, Q)·P, P the Householder reflection swapping e₁ and 1/√n."""
    u = np.full(n, 1 / math.sqrt(n))
    v = np.zeros(n)
    v[0] = 1.0
    v -= u
    p = np.eye(n) - 2 * np.outer(v, v) / (v @ v)
    inner = np.eye(n)
    inner[1:, 1:] = random_orthogonal(n - 1, rng)
    return p @ inner @ p


# ----------------------------------------------------------------------------------------------------
# rewrites


def rotate_stream(graph: ir.Graph, namer: Namer, s: st.Structure, r: np.ndarray, suffix: str) -> None:
    """x → x·R on the whole residual stream (see the module docstring)."""
    stream = s.stream
    for norm in stream.norms:  # γ/β into the readers first: the norms must write bare x̂
        if norm.has_affine or norm.scale_node is not None or norm.bias_node is not None:
            readers, _ = linear_readers(s, norm)
            fold(graph, namer, norm, readers)
    for emb in stream.embeddings:
        table = private_weight(graph, namer, emb.node, 0)
        replace_initializer(table, (const_array(table).astype(np.float64) @ r).astype(np.float32))
        mark_changed(emb.output, suffix, namer)
    for holder, slot in stream.position_tables:  # (T + P)·R = T·R + P·R: position rows rotate with the tokens
        table = private_weight(graph, namer, holder, slot)
        replace_initializer(table, (const_array(table).astype(np.float64) @ r).astype(np.float32))
    for lin in stream.writers:
        set_weight_io(graph, namer, lin, lin.weight_io().astype(np.float64) @ r)
        if lin.bias is not None:
            set_bias(graph, namer, lin, lin.bias_array().astype(np.float64) @ r)
        mark_changed(lin.node.outputs[0], suffix, namer)
        mark_changed(lin.output, suffix, namer)
    for lin in stream.readers:
        set_weight_io(graph, namer, lin, r.T @ lin.weight_io().astype(np.float64))
        lin.node.metadata_props[INPUT_ROTATED_KEY] = "residual stream"
    for value in stream.values:
        mark_changed(value, suffix, namer)
    for norm in stream.norms:
        for node in norm.nodes:
            for out in node.outputs:
                if last_dim(out) != 1 and node.op_type not in ("ReduceMean", "Sqrt", "Reciprocal"):
                    mark_changed(out, suffix, namer)


def rotate_heads(graph: ir.Graph, namer: Namer, att: st.Attention, rs: list[np.ndarray], suffix: str) -> None:
    """V head g → V_g·R_g; output-projection rows of each query head h → R_{g(h)}ᵀ·W_o[h]."""
    d = att.head_dim
    wv = att.v.weight_io().astype(np.float64)
    bv = att.v.bias_array()
    for g, r in enumerate(rs):
        block = slice(g * d, (g + 1) * d)
        wv[:, block] = wv[:, block] @ r
        if bv is not None:
            bv = bv.astype(np.float64)
            bv[block] = bv[block] @ r
    set_weight_io(graph, namer, att.v, wv)
    if bv is not None:
        set_bias(graph, namer, att.v, bv)
    wo = att.o.weight_io().astype(np.float64)
    for h in range(att.num_heads):
        block = slice(h * d, (h + 1) * d)
        wo[block, :] = rs[att.kv_head_of(h)].T @ wo[block, :]
    set_weight_io(graph, namer, att.o, wo)
    att.o.node.metadata_props[INPUT_ROTATED_KEY] = "per-head V/O"
    for value in (att.v.node.outputs[0], att.v.output, *(n.outputs[0] for n in att.v_path), att.pv.outputs[0],
                  *(n.outputs[0] for n in att.o_path)):
        mark_changed(value, suffix, namer)


def insert_online_rotation(graph: ir.Graph, namer: Namer, down: st.Linear, r: np.ndarray, label: str) -> ir.Node:
    """x → MatMul(x, R) in front of `down`, whose weight becomes Rᵀ·W."""
    x = down.input
    base = down.name or x.name
    const = add_initializer(graph, namer, f"{base}_{label}", r.astype(np.float32))
    node = ir.node("MatMul", [x, const], name=namer.fresh(f"{base}_{label}_MatMul"))
    node.outputs[0].name = namer.fresh(f"{x.name}_{label}")
    node.outputs[0].dtype = x.dtype
    node.outputs[0].shape = x.shape
    graph.insert_before(down.node, node)
    down.node.replace_input_with(0, node.outputs[0])
    set_weight_io(graph, namer, down, r.T @ down.weight_io().astype(np.float64))
    down.node.metadata_props[INPUT_ROTATED_KEY] = label
    return node
