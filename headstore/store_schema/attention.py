"""Attention patterns from stored queries and keys, with the model's own score non-linearities.

``pattern = softmax_key(mask(cap(q . k * scale)))``: ``scale`` is the model's (``ModelConfig.score_scale``:
``1/sqrt(d_head)``, or Gemma-2's ``query_pre_attn_scalar ** -0.5``), ``cap(s) = c * tanh(s / c)`` the
attention soft-cap (Gemma-2; none when ``c`` is 0), and the mask is causal, and on sliding-window layers
(Mistral, Gemma-2's even layers) also hides keys ``window`` or more positions back (a query sees itself and
the ``window - 1`` keys before it, as Hugging Face's ``sliding_window_overlay``). Float32 throughout, in the
order Hugging Face's eager attention computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.provenance import ModelConfig, Provenance


def visible(query: Any, key: Any, window: int = 0) -> Any:
    """True where query position ``query`` sees key position ``key``: causal (``key <= query``), and on a
    sliding-window layer (``window`` > 0) only the ``window - 1`` keys before it. numpy arrays or DataArrays
    (broadcast by shape or by dim name)."""
    seen = key <= query
    if window > 0:
        seen = seen & (key > query - window)
    return seen


def key_mask(n: int, window: int = 0) -> np.ndarray:
    """(query_pos, key_pos) bool: True where a key is hidden (the future; past the window when ``window``)."""
    i = np.arange(n)
    return ~visible(i[:, None], i[None, :], window)


def softcap(x: Any, cap: float) -> Any:
    """``cap * tanh(x / cap)`` (Gemma-2's attention and final-logit soft-caps), ``x`` itself when ``cap`` is 0.
    numpy arrays are capped in place (float32 ops); DataArrays lazily."""
    if cap <= 0:
        return x
    c = np.float32(cap)
    if isinstance(x, np.ndarray):
        x /= c
        np.tanh(x, out=x)
        x *= c
        return x
    return np.tanh(x / c) * c


def pattern_block(
    q: np.ndarray,
    k: np.ndarray,
    scale: float | None = None,
    softcap: float = 0.0,
    windows: Sequence[int] | None = None,
) -> np.ndarray:
    """numpy kernel: q (b, l, pos, head, d_head), k (b, l, pos, kv_head, d_head) -> (b, l, head, query_pos,
    key_pos) float32. ``scale`` None: ``d_head ** -0.5``; ``windows``: one per ``l`` (0 = none)."""
    q, k = q.astype(np.float32, copy=False), k.astype(np.float32, copy=False)
    n_heads, n_kv, d_head = q.shape[3], k.shape[3], q.shape[4]
    if n_heads % n_kv:
        raise HeadstoreError(f"q has {n_heads} heads, not a multiple of k's {n_kv} kv heads: the store is damaged")
    k = np.repeat(k, n_heads // n_kv, axis=3)  # head h reads kv head h // (n_heads // n_kv)
    # Same float32 ops as TransformerLens / HF eager attention: (q @ k^T) * scale, soft-cap, -inf mask, softmax.
    scores = np.matmul(q.transpose(0, 1, 3, 2, 4), k.transpose(0, 1, 3, 4, 2))
    scores *= np.float32(d_head**-0.5 if scale is None else scale)
    scores = _softcap(scores, softcap)
    n = scores.shape[-1]
    per_layer = list(windows) if windows is not None else [0] * scores.shape[1]
    if len(per_layer) != scores.shape[1]:
        raise HeadstoreError(f"{len(per_layer)} sliding windows for {scores.shape[1]} layers")
    for i, w in enumerate(per_layer):
        scores[:, i] += np.where(key_mask(n, int(w)), np.float32(-np.inf), np.float32(0))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def derived_pattern(q: xr.DataArray, k: xr.DataArray, config: ModelConfig | None = None) -> xr.DataArray:
    """Attention pattern from stored queries and keys (float32, upcast first; lazy on dask input).

    ``pattern[batch, layer, head, query_pos, key_pos] =
    softmax_key_pos(mask(cap(q[batch, layer, query_pos, head, :] . k[batch, layer, key_pos, kv(head), :] * scale)))``
    with ``kv(head) = head // (n_heads // n_kv_heads)`` and ``scale``, ``cap`` and the sliding windows of
    ``config`` (the module docstring; None: ``1/sqrt(d_head)``, causal only). ``q``, ``k`` are post-rotary on
    rotary models; no attention mask beyond that, as extract passes none. Chunks: one per (batch chunk, layer)
    of ``q``, all heads and positions, like a stored ``pattern``.
    """
    sizes = {"head": q.sizes["head"], "pos": q.sizes["pos"]}
    dims = ("batch", "layer", "head", "query_pos", "key_pos")
    qd = q.transpose("batch", "layer", "pos", "head", "d_head")
    kd = k.transpose("batch", "layer", "pos", "kv_head", "d_head")
    coords = {c: q.coords[c] for c in ("batch", "layer") if c in q.coords}
    layers = [int(x) for x in q["layer"].values] if "layer" in q.coords else list(range(q.sizes["layer"]))
    scale, cap = (None, 0.0) if config is None else (config.score_scale, config.attn_logit_softcap)
    windows = [0 if config is None else config.window(L) for L in layers]
    if q.chunks is None or k.chunks is None:
        data: Any = pattern_block(np.asarray(qd.values), np.asarray(kd.values), scale, cap, windows)
    else:
        import dask.array as da

        qa = qd.data.rechunk({1: 1, 2: -1, 3: -1, 4: -1})  # one layer a block: a float32 pattern block is large
        ka = kd.data.rechunk({0: qa.chunks[0], 1: qa.chunks[1], 2: -1, 3: -1, 4: -1})
        out_chunks = (qa.chunks[0], qa.chunks[1], (sizes["head"],), (sizes["pos"],), (sizes["pos"],))

        def block(qb: np.ndarray, kb: np.ndarray, block_info: Any = None) -> np.ndarray:
            lo, hi = block_info[0]["array-location"][1] if block_info else (0, qb.shape[1])
            return pattern_block(qb, kb, scale, cap, windows[lo:hi])

        data = da.map_blocks(block, qa, ka, chunks=out_chunks, dtype=np.float32, meta=np.empty((0,) * 5, np.float32))
    return xr.DataArray(data, dims=dims, coords=coords)


def z_block(pattern: np.ndarray, v: np.ndarray) -> np.ndarray:
    """numpy kernel: pattern (b, l, head, query_pos, key_pos), v (b, l, pos, kv_head, d_head) -> z (b, l, pos,
    head, d_head) float32; head h reads kv head h // (n_heads // n_kv_heads)."""
    b, n_l, n_heads, n_q, n_k = pattern.shape
    n_kv, d_head = v.shape[3], v.shape[4]
    if n_heads % n_kv:
        raise HeadstoreError(f"pattern has {n_heads} heads, not a multiple of v's {n_kv} kv heads: store damaged")
    g = n_heads // n_kv
    p = pattern.astype(np.float32, copy=False).reshape(b, n_l, n_kv, g, n_q, n_k)
    vv = v.astype(np.float32, copy=False).transpose(0, 1, 3, 2, 4)[:, :, :, None]  # (b, l, kv, 1, key_pos, d)
    z = np.matmul(p, vv).reshape(b, n_l, n_heads, n_q, d_head)
    return np.ascontiguousarray(z.transpose(0, 1, 3, 2, 4))


def derived_z(pattern: xr.DataArray, v: xr.DataArray) -> xr.DataArray:
    """``z[batch, layer, pos, head, d_head] = sum_key_pos pattern[batch, layer, head, pos, key_pos] *
    v[batch, layer, key_pos, kv(head), d_head]`` (float32; lazy on dask input, one chunk per chunk of
    ``pattern``, which is one per (batch chunk, layer)). The stores that do not keep z (``--fields auto``)."""
    pd = pattern.transpose("batch", "layer", "head", "query_pos", "key_pos")
    vd = v.transpose("batch", "layer", "pos", "kv_head", "d_head")
    dims = ("batch", "layer", "pos", "head", "d_head")
    coords = {c: pattern.coords[c] for c in ("batch", "layer", "head") if c in pattern.coords}
    if pd.chunks is None and vd.chunks is None:
        return xr.DataArray(z_block(np.asarray(pd.values), np.asarray(vd.values)), dims=dims, coords=coords)
    import dask.array as da

    pa = pd.data if pd.chunks is not None else da.from_array(np.asarray(pd.values))
    pa = pa.rechunk({2: -1, 3: -1, 4: -1})
    va = vd.data if vd.chunks is not None else da.from_array(np.asarray(vd.values))
    va = va.rechunk({0: pa.chunks[0], 1: pa.chunks[1], 2: -1, 3: -1, 4: -1})
    out_chunks = (pa.chunks[0], pa.chunks[1], (vd.sizes["pos"],), (pd.sizes["head"],), (vd.sizes["d_head"],))
    data = da.map_blocks(z_block, pa, va, chunks=out_chunks, dtype=np.float32, meta=np.empty((0,) * 5, np.float32))
    return xr.DataArray(data, dims=dims, coords=coords)


def pattern_layer_index(prov: Provenance) -> list[int]:
    """Positions along ``layer`` (not model layer numbers) whose ``pattern`` chunks are written."""
    stored = set(prov.stored_pattern_layers)
    return [i for i, L in enumerate(prov.layers) if L in stored]


_softcap = softcap  # pattern_block's parameter of that name hides the function
