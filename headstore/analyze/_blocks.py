"""Streaming over a store block by block, and the top-k selection with a fixed tie rule, shared by the
example analyzers (``top_attention``, ``top_effects``, ``attention_search``, ``head_similarity``).

A block is one batch chunk of the store (its ``tokens`` chunking) times a group of layers. Each block's
arrays are read, reduced by a numpy function to something small (a few candidates per head, or sums) and
released, so memory holds a few blocks whatever the number of tokens; the blocks run as dask tasks (in
parallel on the threaded scheduler, or on a cluster).

Tie rule of every top-k here: a larger value first; among equal values the entry that comes first in the
store (the earlier sequence, in ``batch`` order, then the earlier query position, then the earlier key
position). :func:`top_k_rows` applies it inside a block and :func:`merge_top` across blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import xarray as xr


def batch_slices(ds: xr.Dataset) -> list[slice]:
    """The store's batch chunks as slices along ``batch`` (one slice when ``tokens`` is in memory)."""
    chunks = ds["tokens"].chunksizes.get("batch") if ds["tokens"].chunks is not None else None
    sizes = chunks if chunks else (ds.sizes["batch"],)
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + int(n)))
        start += int(n)
    return out


def layer_groups(layers: Sequence[int], size: int) -> list[list[int]]:
    """Layer indices (along ``layer``) in groups of ``size``."""
    return [list(layers[i : i + size]) for i in range(0, len(layers), size)]


def _layer_blocks(arrays: dict[str, xr.DataArray]) -> list[range]:
    """The dask blocks along ``layer`` of the largest dask-backed array that has the dim (a sharded store's
    shard holds every layer: one block; a chunked store's chunk one layer), as ranges of layer positions."""
    lazy = [da for da in arrays.values() if "layer" in da.dims and da.chunks is not None]
    if not lazy:
        return []
    sizes = max(lazy, key=lambda da: da.nbytes).chunksizes["layer"]
    bounds = np.cumsum((0, *sizes))
    return [range(int(a), int(b)) for a, b in pairwise(bounds)]


def _run_groups(
    fn: Callable[..., Any],
    start: int,
    blocks: dict[str, np.ndarray],
    axes: dict[str, int],
    groups: list[tuple[list[int], dict[str, Any]]],
    kwargs: dict[str, Any],
) -> list[Any]:
    """``fn`` on each group's layers (positions into the blocks' ``layer`` axis ``axes[name]``) of one task."""
    out = []
    for where, extra in groups:
        whole = {n: where == list(range(b.shape[axes[n]])) for n, b in blocks.items() if n in axes}
        part = {n: (b if whole.get(n, True) else np.take(b, where, axis=axes[n])) for n, b in blocks.items()}
        out.append(fn(start=start, **part, **kwargs, **extra))
    return out


def stream(
    fn: Callable[..., Any],
    arrays: dict[str, xr.DataArray],
    batches: Sequence[slice],
    groups: Sequence[Sequence[int]],
    group_kwargs: Sequence[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> list[tuple[slice, list[int], Any]]:
    """``fn(start=..., **numpy blocks, **kwargs, **group_kwargs[g])`` for every (batch slice, layer group ``g``), as
    dask tasks computed together; ``start`` is the block's first row along ``batch``. Arrays lacking ``batch`` or
    ``layer`` are handed whole along it. One task per batch slice and stored layer block (``_layer_blocks``: a
    whole shard is read once, then cut into the groups that start in it), so a store is read once whatever
    the groups. Returns ``(batch slice, layer group, fn's result)`` per block, in the order of ``groups``."""
    import dask

    extras = list(group_kwargs) if group_kwargs is not None else [{} for _ in groups]
    spans = _layer_blocks(arrays)
    by_span: dict[int, list[int]] = {}
    for g, group in enumerate(groups):
        first = group[0] if len(group) else 0
        span = next((j for j, r in enumerate(spans) if first in r), -1)
        by_span.setdefault(span, []).append(g)
    tasks, keys = [], []
    for bs in batches:
        for members in by_span.values():
            layers = sorted({i for g in members for i in groups[g]})
            blocks, axes = {}, {}
            for name, da in arrays.items():
                sel: dict[str, Any] = {}
                if "batch" in da.dims:
                    sel["batch"] = bs
                if "layer" in da.dims:
                    sel["layer"] = layers
                    axes[name] = da.dims.index("layer")
                part = da.isel(sel)
                blocks[name] = part.data if part.chunks is not None else np.asarray(part.values)
            parts = [([layers.index(i) for i in groups[g]], extras[g]) for g in members]
            tasks.append(dask.delayed(_run_groups)(fn, bs.start, blocks, axes, parts, kwargs))
            keys.append((bs, members))
    results = dask.compute(*tasks)
    found = {(bs.start, g): res for (bs, members), out in zip(keys, results) for g, res in zip(members, out)}
    return [(bs, list(group), found[(bs.start, g)]) for bs in batches for g, group in enumerate(groups)]


def top_k_rows(values: np.ndarray, k: int) -> np.ndarray:
    """numpy: ``values`` (rows, n), ``-inf`` where excluded -> (rows, k) indices into ``n`` of each row's k
    largest, largest first, ties to the smaller index; -1 pads rows with fewer than k finite entries."""
    rows, n = values.shape
    out = np.full((rows, k), -1, np.int64)
    kk = min(k, n)
    if kk == 0:
        return out
    part = np.argpartition(-values, kk - 1, axis=1)[:, :kk]
    thresholds = np.take_along_axis(values, part, 1).min(1)
    for r in range(rows):
        v, t = values[r], thresholds[r]
        if t == -np.inf:
            idx = np.flatnonzero(v > -np.inf)
        else:
            above = np.flatnonzero(v > t)
            idx = np.concatenate([above, np.flatnonzero(v == t)[: kk - above.size]])
        idx = idx[np.lexsort((idx, -v[idx]))]
        out[r, : idx.size] = idx
    return out


def merge_top(values: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """numpy: candidates ``values`` (rows, m) (NaN: none) with their store order ``order`` (rows, m, n_keys;
    compared lexicographically) -> (rows, k) indices into ``m`` of the k best by the module's tie rule (-1:
    fewer than k candidates)."""
    rows = values.shape[0]
    out = np.full((rows, k), -1, np.int64)
    for r in range(rows):
        ok = np.flatnonzero(np.isfinite(values[r]))
        keys = [order[r, ok, j] for j in range(order.shape[2] - 1, -1, -1)]
        best = ok[np.lexsort((*keys, -values[r, ok]))][:k]
        out[r, : best.size] = best
    return out


def masked(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values`` as float64 with ``-inf`` where not ``keep`` or not finite (NaN: not measured)."""
    out = np.where(keep, values.astype(np.float64), -np.inf)
    out[~np.isfinite(out)] = -np.inf
    return out


def token_strings(ds: xr.Dataset, ids: np.ndarray) -> np.ndarray:
    """Token ids (any shape, -1: none) -> their vocabulary strings ('' for -1, or for every id on a store
    without ``vocab``)."""
    if "vocab" not in ds:
        return np.full(ids.shape, "", dtype=object)
    vocab = ds.hs.vocab
    return np.where(ids >= 0, vocab[np.clip(ids, 0, vocab.size - 1)], "").astype(object)


def tokens_at(ds: xr.Dataset, row: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Token ids at (row along ``batch``, position) pairs of any shape, -1 where ``row`` or ``pos`` is -1; reads
    only the sequences named."""
    ok = (row >= 0) & (pos >= 0)
    rows = np.unique(row[ok])
    if rows.size == 0:
        return np.full(row.shape, -1, np.int64)
    tokens = np.asarray(ds["tokens"].isel(batch=rows).values).astype(np.int64)
    at = np.searchsorted(rows, np.where(ok, row, rows[0]))
    return np.where(ok, tokens[at, np.maximum(pos, 0)], -1)
