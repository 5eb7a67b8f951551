"""``top_attention``: each head's k largest attention weights over the whole store, with their tokens.

For head ``(L, h)`` the candidates are the entries ``pattern[b, L, h, q, k]`` with ``k <= q`` and both
``q`` and ``k`` real tokens (``< length[b]`` on a right-padded store), less the keys holding the BOS token
(``exclude_bos``) and the diagonal ``k == q`` (``exclude_self``); a NaN weight (a layer whose pattern was
not stored) is never a candidate. The k largest are kept; ties go to the entry that comes first in the
store (earlier sequence, then earlier query, then earlier key: ``_blocks``). Streamed one batch chunk and
one stored layer block (a shard) at a time, keeping the best k per head so far and merging each block's k into them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._blocks import batch_slices, masked, merge_into, stream, token_strings, tokens_at, top_k_rows
from headstore.analyze._maths import bos_id, require, sequence_lengths
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Heads
from headstore.store_schema import HeadstoreError, selection

REQUIRES = ("tokens", "pattern")


def _block(
    start: int,
    pattern: np.ndarray,
    tokens: np.ndarray,
    length: np.ndarray,
    heads: np.ndarray,
    k: int,
    bos: int,
    exclude_self: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One (batch chunk, layer) block -> (weights (l, h, k), where (l, h, k, 3): row, query, key)."""
    n_b, n_l, _, n_q, n_k = pattern.shape
    q, key = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
    keep = (key <= q)[None] & (q < length[:, None, None]) & (key < length[:, None, None])  # b, q, k
    if bos >= 0:
        keep &= (tokens != bos)[:, None, :]
    if exclude_self:
        keep &= (key != q)[None]
    pat = pattern[:, :, heads].transpose(1, 2, 0, 3, 4)  # l, h, b, q, k
    vals = masked(pat, keep[None, None]).reshape(n_l * heads.size, -1)
    idx = top_k_rows(vals, k)
    weights = np.where(idx >= 0, np.take_along_axis(vals, np.maximum(idx, 0), 1), np.nan)
    b, qq, kk = np.unravel_index(np.maximum(idx, 0), (n_b, n_q, n_k))
    where = np.stack([b + start, qq, kk], -1)
    return weights.reshape(n_l, heads.size, k), where.reshape(n_l, heads.size, k, 3)


def top_attention(
    ds: xr.Dataset, *, heads: Heads = "all", k: int = 20, exclude_bos: bool = True, exclude_self: bool = False
) -> xr.Dataset:
    """Each head's ``k`` largest attention weights over the store, largest first.

    ``weight[layer, head, rank] = pattern[b, layer, head, q, key]`` for the rank-th largest entry with
    ``key <= q < length[b]``, BOS keys left out (``exclude_bos``), ``key != q`` (``exclude_self``); ties go to the
    earlier sequence, then query, then key. Also ``sequence`` (the ``batch`` label of ``b``), ``query_pos``,
    ``key_pos``, ``query_token``, ``key_token`` (ids) and ``query_str``, ``key_str``. A rank with no entry
    (a head whose pattern was not stored, or fewer than ``k`` entries) has weight NaN and -1 elsewhere.
    Computed on call, streaming one batch chunk and one stored layer block at a time.
    """
    require(ds, REQUIRES, "top-attention")
    chosen = _args.heads(ds, heads, "heads")
    if not selection.is_int(k) or int(k) < 1:
        raise HeadstoreError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    layers = ds.hs.layers
    by_layer = {i: np.array(sorted(h for L, h in chosen if L == layer)) for i, layer in enumerate(layers)}
    todo = [i for i, hs in by_layer.items() if hs.size]
    bos = bos_id(ds) if exclude_bos else None
    arrays = {"pattern": ds["pattern"], "tokens": ds["tokens"], "length": sequence_lengths(ds)}
    n_l, n_h = len(layers), ds.sizes["head"]
    weight = np.full((n_l, n_h, k), np.nan)  # float64 while merging, as the blocks' candidates
    where = np.full((n_l, n_h, k, 3), -1, np.int64)
    for _bs, (i,), (w, at) in stream(  # a group per layer with its own heads; a stored block is read once for all
        _block, arrays, batch_slices(ds), [[i] for i in todo], [{"heads": by_layer[i]} for i in todo], k=k,
        bos=-1 if bos is None else bos, exclude_self=bool(exclude_self),
    ):  # fmt: skip
        # the best k so far and this block's k, merged: the top k of a union is the top k of the parts' top k
        hs = by_layer[i]
        weight[i, hs], where[i, hs] = merge_into(weight[i, hs], where[i, hs], w[0], at[0], k)
    return _result(ds, weight.astype(np.float32), where, heads, k, exclude_bos, exclude_self)


def _result(
    ds: xr.Dataset, weight: np.ndarray, where: np.ndarray, heads: Any, k: int, exclude_bos: bool, exclude_self: bool
) -> xr.Dataset:
    """The Dataset of :func:`top_attention` from the merged (layer, head, rank) weights and (row, q, key)."""
    row, q, key = where[..., 0], where[..., 1], where[..., 2]
    ok = row >= 0
    q_tok, k_tok = tokens_at(ds, row, q), tokens_at(ds, row, key)
    labels = selection.labels(ds)
    dims = ("layer", "head", "rank")
    out = xr.Dataset(
        {
            "weight": (dims, weight),
            "sequence": (dims, np.where(ok, labels[np.maximum(row, 0)], -1).astype(np.int64)),
            "query_pos": (dims, q),
            "key_pos": (dims, key),
            "query_token": (dims, q_tok.astype(np.int64)),
            "key_token": (dims, k_tok.astype(np.int64)),
            "query_str": (dims, token_strings(ds, q_tok)),
            "key_str": (dims, token_strings(ds, k_tok)),
        },
        coords={"layer": ds.hs.layers, "head": np.arange(ds.sizes["head"]), "rank": np.arange(k)},
    )
    out.attrs.update(
        {
            "analyzer": "top-attention", "k": k, "exclude_bos": int(bool(exclude_bos)),
            "exclude_self": int(bool(exclude_self)), "heads": heads if isinstance(heads, str) else "selected",
        }
    )  # fmt: skip
    return out


SPEC = AnalyzerSpec(
    "top-attention", top_attention, REQUIRES,
    doc="Each head's k largest attention weights over the store, with sequence, positions and tokens",
    params={"heads": Heads, "k": int, "exclude_bos": bool, "exclude_self": bool},
)  # fmt: skip
register_analyzer(SPEC)
