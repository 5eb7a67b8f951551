"""``circuits``: where token pairs rank in each head's OV and QK circuits, from the weights only.

Following the seed notebook (``Interpreting If Else``), per layer ``L`` and query head ``h``
(``kv(h)`` its kv head), with ``E`` the embedding (``W_E``, or ``W_EE``, the effective embedding)::

    C_OV[src, out] = ln_final(ln1(E[src]) @ W_V[L, kv(h)] @ W_O[L, h]) @ W_U[:, out]
    C_QK[q, k]     = (ln1(E[q]) @ W_Q[L, h]) . (ln1(E[k]) @ W_K[L, kv(h)])

LayerNorm is folded (compatibility mode), so ``ln1`` and ``ln_final`` are plain normalisations,
``(x - mean) / sqrt(var + eps)`` (LN) or ``x / sqrt(mean(x^2) + eps)`` (RMS), applied row by row.
Biases are left out, as in the seed (positions and rotary too: token-only circuits).

Per family, the model's own structure: no ``ln1`` where the model has none (OLMo-2 reads the residual
raw); the q and k norms on the queries and keys of q/k-norm models (Qwen3: RMSNorm over each head's d_head
times its gain; OLMo-2: over all heads' queries / keys); on post-norm models (Gemma-2, OLMo-2) the head's
output passes its layer's post-attention norm before ``ln_final``: ``W_O`` becomes ``W_O * ln1_post_w``
(the norm's scale cancels in ``ln_final``'s normalisation, up to its eps).

Ranks count the entries strictly above the target (0 = top); ``percentile = 1 - rank / d_vocab``.

- ``ov_rank``: rank of ``src`` among all sources in the column ``C_OV[:, out]`` (which source
  tokens most promote ``out``);
- ``ov_rank_reverse``: rank of ``out`` among all outputs in the row ``C_OV[src, :] - b_U`` (what
  ``src`` promotes; the seed subtracts ``b_U`` there, ``subtract_b_U=False`` leaves it);
- ``qk_rank``: rank of ``key`` among all keys in the row ``C_QK[query, :]``;
- ``qk_rank_reverse``: rank of ``query`` among all queries in the column ``C_QK[:, key]``.

Memory: a ``d_vocab x d_vocab`` matrix is never formed. Each (layer, head) needs one column or row
of a circuit, computed from the ``(d_vocab, d_model)`` normalised embedding through ``d_head``-wide
factors: ``ln1(E) @ W_V`` is ``(d_vocab, d_head)``, its image through ``W_O`` and ``ln_final`` is
``(d_vocab, d_model)``, and the result a ``(d_vocab,)`` vector, so peak memory is
O(d_vocab x d_model) (a few copies of the embedding) whatever the number of heads; time is
O(n_layers x n_heads x d_vocab x d_model).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import kv_index, normalize_rows, require
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Embedding, Token
from headstore.store_schema import HeadstoreError

NEEDS = ("W_Q", "W_K", "W_V", "W_O", "W_U", "b_U", "vocab")
EMBEDDINGS = ("W_E", "W_EE")
REQUIRES = (EMBEDDINGS[0], *NEEDS)  # with the default embedding


def _embedding(ds: xr.Dataset, embedding: str) -> np.ndarray:
    if embedding not in EMBEDDINGS:
        raise HeadstoreError(f"embedding {embedding!r}: choose W_E or W_EE")
    cfg = ds.hs.config
    extra = (*(("q_norm_w", "k_norm_w") if cfg.qk_norm else ()), *(("ln1_post_w",) if cfg.post_norm else ()))
    require(ds, (embedding, *NEEDS, *extra), "circuits")
    return np.asarray(ds[embedding].values, dtype=np.float32)


def _ln1(ds: xr.Dataset, x: np.ndarray) -> np.ndarray:
    """What attention reads from residual rows ``x``: ``ln1(x)``, or ``x`` on models without ln1 (OLMo-2)."""
    return normalize_rows(x, ds) if ds.hs.config.pre_norm else x


def _w_write(ds: xr.Dataset) -> np.ndarray:
    """(layer, head, d_head, d_model) ``W_O``, times the post-attention norm's gain on post-norm models."""
    w = _w(ds, "W_O")
    return w * _w(ds, "ln1_post_w")[:, None, None, :] if ds.hs.config.post_norm else w


def _qk_norm(ds: xr.Dataset, y: np.ndarray, layer: int, which: str) -> np.ndarray:
    """Queries / keys ``y`` (n, heads, d_head) of every head through the model's q / k norm (none: ``y``)."""
    cfg = ds.hs.config
    if not cfg.qk_norm:
        return y
    axes = (-1,) if cfg.qk_norm == "per_head" else (-2, -1)
    y64 = y.astype(np.float64)
    out = y64 / np.sqrt((y64 * y64).mean(axis=axes, keepdims=True) + cfg.eps)
    return (out * _w(ds, f"{which}_norm_w")[layer]).astype(np.float32)


def _queries(ds: xr.Dataset, x: np.ndarray, layer: int) -> np.ndarray:
    """(n, head, d_head) every head's query of the attention-input rows ``x`` (no bias, no rotary)."""
    return _qk_norm(ds, np.einsum("nm,hmd->nhd", x, _w(ds, "W_Q")[layer]), layer, "q")


def _keys(ds: xr.Dataset, x: np.ndarray, layer: int) -> np.ndarray:
    """(n, kv_head, d_head) every kv head's key of the attention-input rows ``x`` (no bias, no rotary)."""
    return _qk_norm(ds, np.einsum("nm,hmd->nhd", x, _w(ds, "W_K")[layer]), layer, "k")


def _heads(ds: xr.Dataset) -> list[tuple[int, int, int]]:
    """(layer index in the store, head, kv head) for every head."""
    kv = kv_index(ds).values
    return [(i, h, int(kv[h])) for i in range(ds.sizes["layer"]) for h in range(ds.sizes["head"])]


def _w(ds: xr.Dataset, name: str) -> np.ndarray:
    return np.asarray(ds[name].values, dtype=np.float32)


def _per_kv_head(ds: xr.Dataset, x: np.ndarray, W: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(layer, head, x @ W[layer, kv head])`` for every head; the product is computed once per kv
    head and shared by the query heads of its group (grouped-query attention)."""
    key, prod = None, x
    for L, h, g in _heads(ds):
        if key != (L, g):
            key, prod = (L, g), x @ W[L, g]
        yield L, h, prod


def _top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """(..., n) -> (..., k) ids of the k largest per row, largest first, ties by id: ``argsort(-scores,
    stable)[..., :k]``, sorting only the entries at or above each row's k-th largest value."""
    flat = scores.reshape(-1, scores.shape[-1])
    if np.isnan(flat).any():
        return np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    kth = -np.partition(-flat, k - 1, axis=-1)[:, k - 1]
    out = np.empty((len(flat), k), np.int64)
    for i, row in enumerate(flat):
        cand = np.flatnonzero(row >= kth[i])
        out[i] = cand[np.argsort(-row[cand], kind="stable")[:k]]
    return out.reshape(*scores.shape[:-1], k)


def _ranked(ds: xr.Dataset, scores: np.ndarray, target: int, prefix: str, top_k: int) -> xr.Dataset:
    """scores (layer, head, d_vocab) -> rank/percentile of ``target`` and the top_k entries."""
    n = scores.shape[-1]
    rank = (scores > scores[..., target : target + 1]).sum(-1)
    k = min(top_k, n)
    top = _top_ids(scores, k)
    coords = {c: ds[c].values for c in ("layer", "head") if c in ds.coords}
    vocab = ds.hs.vocab
    dims3 = ("layer", "head", "top")
    return xr.Dataset(
        {
            f"{prefix}_rank": (("layer", "head"), rank.astype(np.int64)),
            f"{prefix}_percentile": (("layer", "head"), 1.0 - rank / n),
            f"{prefix}_value": (("layer", "head"), scores[..., target]),
            f"{prefix}_top_id": (dims3, top.astype(np.int64)),
            f"{prefix}_top_token": (dims3, vocab[top]),
            f"{prefix}_top_value": (dims3, np.take_along_axis(scores, top, -1)),
        },
        coords=coords,
    )


def _ov_column(ds: xr.Dataset, out: int, embedding: str = "W_E") -> np.ndarray:
    """(layer, head, d_vocab): ``C_OV[:, out]`` for every head, through ``d_head``-wide factors.

    With ``y = x_v @ W`` (``x_v = ln1(E) @ W_V``, ``W = W_O[L, h]``, ``M = d_model``) and ``u = W_U[:, out]``:
    ``y . u = x_v @ (W u)``; LN's row mean ``x_v @ (W 1) / M`` enters as ``- mean * sum(u)``; the row's squared
    norm (centred for LN) is ``x_v G x_v^T`` with ``G = W W^T`` (LN: ``- (W 1)(W 1)^T / M``), so
    ``C_OV[:, out] = (y . u - mean sum(u)) / sqrt(x_v G x_v^T / M + eps)``: no ``(d_vocab, d_model)`` product.
    """
    x = _ln1(ds, _embedding(ds, embedding))
    W_V, W_O, u = _w(ds, "W_V"), _w_write(ds), _w(ds, "W_U")[:, out].astype(np.float64)
    cfg = ds.hs.config
    ln, m = cfg.normalization_type == "LN", u.shape[0]
    res = np.zeros((ds.sizes["layer"], ds.sizes["head"], x.shape[0]), np.float32)
    for L, h, xv in _per_kv_head(ds, x, W_V):
        w = W_O[L, h].astype(np.float64)  # d_head, d_model
        w1 = w.sum(1)
        gram = w @ w.T - (np.outer(w1, w1) / m if ln else 0.0)
        x64 = xv.astype(np.float64)
        dot = x64 @ (w @ u) - ((x64 @ w1) * (u.sum() / m) if ln else 0.0)
        res[L, h] = dot / np.sqrt(((x64 @ gram) * x64).sum(-1) / m + cfg.eps)
    return res


def _ov_row(ds: xr.Dataset, src: int, embedding: str = "W_E") -> np.ndarray:
    """(layer, head, d_vocab): ``C_OV[src, :]`` for every head."""
    x = _ln1(ds, _embedding(ds, embedding)[src])
    W_V, W_O, W_U = _w(ds, "W_V"), _w_write(ds), _w(ds, "W_U")
    res = np.zeros((ds.sizes["layer"], ds.sizes["head"], W_U.shape[1]), np.float32)
    for L, h, g in _heads(ds):
        res[L, h] = normalize_rows((x @ W_V[L, g]) @ W_O[L, h], ds) @ W_U
    return res


def _qk_row(ds: xr.Dataset, query: int, embedding: str = "W_E") -> np.ndarray:
    """(layer, head, d_vocab): ``C_QK[query, :]`` (scores of every key) for every head."""
    x = _ln1(ds, _embedding(ds, embedding))
    res = np.zeros((ds.sizes["layer"], ds.sizes["head"], x.shape[0]), np.float32)
    if not ds.hs.config.qk_norm:
        W_Q, W_K = _w(ds, "W_Q"), _w(ds, "W_K")
        # (x @ W_K) @ q = x @ (W_K @ q): every head's d_model vector, then one product with x
        vecs = np.stack([W_K[L, g] @ (x[query] @ W_Q[L, h]) for L, h, g in _heads(ds)], 1)  # d_model, heads
        return (x @ vecs).T.reshape(res.shape)
    kv = kv_index(ds).values
    for L in range(ds.sizes["layer"]):
        q, k = _queries(ds, x[query : query + 1], L)[0], _keys(ds, x, L)  # (head, d_head), (d_vocab, kv, d_head)
        for h in range(ds.sizes["head"]):
            res[L, h] = k[:, kv[h]] @ q[h]
    return res


def _qk_column(ds: xr.Dataset, key: int, embedding: str = "W_E") -> np.ndarray:
    """(layer, head, d_vocab): ``C_QK[:, key]`` (scores from every query) for every head."""
    x = _ln1(ds, _embedding(ds, embedding))
    res = np.zeros((ds.sizes["layer"], ds.sizes["head"], x.shape[0]), np.float32)
    if not ds.hs.config.qk_norm:
        W_Q, W_K = _w(ds, "W_Q"), _w(ds, "W_K")
        vecs = np.stack([W_Q[L, h] @ (x[key] @ W_K[L, g]) for L, h, g in _heads(ds)], 1)  # (x @ W_Q) @ k
        return (x @ vecs).T.reshape(res.shape)
    kv = kv_index(ds).values
    for L in range(ds.sizes["layer"]):
        q, k = _queries(ds, x, L), _keys(ds, x[key : key + 1], L)[0]  # (d_vocab, head, d_head), (kv, d_head)
        for h in range(ds.sizes["head"]):
            res[L, h] = q[:, h] @ k[kv[h]]
    return res


def _ov_rank(
    ds: xr.Dataset, out_token: str | int, src_token: str | int, embedding: str = "W_E", top_k: int = 10
) -> xr.Dataset:
    """Rank of ``src`` among all sources for output ``out`` (``ov_*``), and the top sources."""
    out, src = _args.token(ds, out_token, "out_token"), _args.token(ds, src_token, "src_token")
    return _ranked(ds, _ov_column(ds, out, embedding), src, "ov", top_k)


def _ov_rank_reverse(
    ds: xr.Dataset,
    out_token: str | int,
    src_token: str | int,
    embedding: str = "W_E",
    top_k: int = 10,
    subtract_b_U: bool = True,
) -> xr.Dataset:
    """Rank of ``out`` among all outputs of source ``src`` (``ov_rev_*``), and the top outputs."""
    out, src = _args.token(ds, out_token, "out_token"), _args.token(ds, src_token, "src_token")
    row = _ov_row(ds, src, embedding)
    if subtract_b_U:
        row = row - _w(ds, "b_U")
    return _ranked(ds, row, out, "ov_rev", top_k)


def _qk_rank(
    ds: xr.Dataset, query_token: str | int, key_token: str | int, embedding: str = "W_E", top_k: int = 10
) -> xr.Dataset:
    """Rank of ``key`` among all keys for query ``query`` (``qk_*``), and the top keys."""
    q, k = _args.token(ds, query_token, "query_token"), _args.token(ds, key_token, "key_token")
    return _ranked(ds, _qk_row(ds, q, embedding), k, "qk", top_k)


def _qk_rank_reverse(
    ds: xr.Dataset, query_token: str | int, key_token: str | int, embedding: str = "W_E", top_k: int = 10
) -> xr.Dataset:
    """Rank of ``query`` among all queries attending to ``key`` (``qk_rev_*``), and the top queries."""
    q, k = _args.token(ds, query_token, "query_token"), _args.token(ds, key_token, "key_token")
    return _ranked(ds, _qk_column(ds, k, embedding), q, "qk_rev", top_k)


def circuits(
    ds: xr.Dataset,
    *,
    out_token: int | str = " else",
    src_token: int | str = " if",
    query_token: int | str = ")",
    key_token: int | str = " if",
    embedding: str = "W_E",
    top_k: int = 10,
) -> xr.Dataset:
    """All four ranks (``ov``, ``ov_rev``, ``qk``, ``qk_rev``) per (layer, head), with top-k lists.

    Tokens are ids or strings that are exactly one vocabulary entry (``ds.hs.token_id``). Computed on call
    (weights only: a few passes over the ``(d_vocab, d_model)`` embedding per head, no activations).
    """
    res = xr.merge(
        [
            _ov_rank(ds, out_token, src_token, embedding, top_k),
            _ov_rank_reverse(ds, out_token, src_token, embedding, top_k),
            _qk_rank(ds, query_token, key_token, embedding, top_k),
            _qk_rank_reverse(ds, query_token, key_token, embedding, top_k),
        ]
    )
    res.attrs = {
        "analyzer": "circuits",
        "out_token": out_token,
        "src_token": src_token,
        "query_token": query_token,
        "key_token": key_token,
        "embedding": embedding,
        "d_vocab": int(ds.sizes["d_vocab"]),
    }
    return res


SPEC = AnalyzerSpec(
    "circuits", circuits, REQUIRES,
    doc="OV/QK circuit ranks of token pairs per head, from the weights only (seed: if/else circuits)",
    params={
        "out_token": Token, "src_token": Token, "query_token": Token, "key_token": Token,
        "embedding": Embedding, "top_k": int,
    },
)  # fmt: skip
register_analyzer(SPEC)
