"""Streaming over a store block by block, and the top-k selection with a fixed tie rule, shared by the
example analyzers (``top_attention``, ``top_effects``, ``attention_search``, ``head_similarity``).

A block is one batch chunk of the store (its ``tokens`` chunking) times a group of layers. Each block's
arrays are read, reduced by a numpy function to something small (a few candidates per head, or sums) and
released, and the caller folds each block's reduction into its running one (the best k so far, sums), so
memory holds a few blocks whatever the number of tokens; the blocks run as dask tasks, one wave (a block
per worker thread) at a time (in parallel on the threaded scheduler, or on a cluster).

Tie rule of every top-k here: a larger value first; among equal values the entry that comes first in the
store (the earlier sequence, in ``batch`` order, then the earlier query position, then the earlier key
position). :func:`top_k_rows` applies it inside a block and :func:`merge_top` (:func:`merge_into`) across blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def _wave_size() -> int:
    """Blocks computed together: one per worker thread (dask's threaded pool, or a distributed client's threads)."""
    import sys

    import dask
    from dask.system import CPU_COUNT

    default_client = getattr(sys.modules.get("distributed"), "default_client", None)  # a client needs it imported
    if default_client is not None:  # (a module of another package named "distributed" has none)
        try:
            return max(1, sum(default_client().nthreads().values()))
        except ValueError:  # no client: the local scheduler
            pass
    return max(1, int(dask.config.get("num_workers", None) or CPU_COUNT))


def _layer_blocks(arrays: dict[str, xr.DataArray]) -> list[range]:
    """The dask blocks along ``layer`` of the largest dask-backed array that has ``batch`` and ``layer`` (a sharded
    store's shard holds every layer: one block; a chunked store's chunk one layer), as ranges of layer positions."""
    lazy = [da for da in arrays.values() if {"batch", "layer"} <= set(da.dims) and da.chunks is not None]
    if not lazy:
        return []
    sizes = max(lazy, key=lambda da: da.nbytes).chunksizes["layer"]
    bounds = np.cumsum((0, *sizes))
    return [range(int(a), int(b)) for a, b in pairwise(bounds)]


def _run_groups(
    fn: Callable[..., Any],
    start: int,
    blocks: dict[str, Any],
    axes: dict[str, int],
    groups: list[tuple[list[int], dict[str, Any]]],
    kwargs: dict[str, Any],
) -> list[Any]:
    """``fn`` on each group's layers (positions into the blocks' ``layer`` axis ``axes[name]``) of one task."""
    out = []
    for where, extra in groups:
        whole = {n: where == list(range(np.shape(b)[axes[n]])) for n, b in blocks.items() if n in axes}
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
) -> Iterator[tuple[slice, list[int], Any]]:
    """``fn(start=..., **numpy blocks, **kwargs, **group_kwargs[g])`` for every (batch slice, layer group ``g``), as
    dask tasks; ``start`` is the block's first row along ``batch``. Arrays lacking ``batch`` (weights) are read once
    and handed whole, or by layer group when they have ``layer``.

    One task per batch slice and stored layer block (``_layer_blocks``: a whole shard is read once, then cut into
    the groups that start in it), so the store is read once whatever the groups. Yields ``(batch slice, layer
    group, fn's result)`` per group, batch slice by batch slice, computing one wave of tasks (a task per worker
    thread) at a time: memory holds a wave's blocks and what the caller folds, whatever the number of blocks (one
    ``dask.compute`` of every block would let the scheduler read blocks far ahead of the tasks that reduce them)."""
    import dask

    extras = list(group_kwargs) if group_kwargs is not None else [{} for _ in groups]
    shared = {name: dask.delayed(np.asarray(da.values), pure=False) for name, da in arrays.items()
              if "batch" not in da.dims and "layer" not in da.dims}  # fmt: skip
    per_layer = {name: da.load() for name, da in arrays.items() if "batch" not in da.dims and "layer" in da.dims}
    spans = _layer_blocks(arrays)
    by_span: dict[int, list[int]] = {}
    for g, group in enumerate(groups):
        first = group[0] if len(group) else 0
        by_span.setdefault(next((j for j, r in enumerate(spans) if first in r), -1), []).append(g)
    keys = [(bs, members) for bs in batches for members in by_span.values()]
    wave = _wave_size()
    for w in range(0, len(keys), wave):
        tasks = []
        for bs, members in keys[w : w + wave]:
            layers = sorted({i for g in members for i in groups[g]})
            blocks: dict[str, Any] = dict(shared)
            axes = {}
            for name, da in arrays.items():
                if name in shared:
                    continue
                part = per_layer.get(name, da)
                if "layer" in da.dims:
                    part, axes[name] = part.isel(layer=layers), da.dims.index("layer")
                if "batch" in da.dims:
                    part = part.isel(batch=bs)
                blocks[name] = part.data if part.chunks is not None else np.asarray(part.values)
            parts = [([layers.index(i) for i in groups[g]], extras[g]) for g in members]
            tasks.append(dask.delayed(_run_groups)(fn, bs.start, blocks, axes, parts, kwargs))
        for (bs, members), out in zip(keys[w : w + wave], dask.compute(*tasks)):
            for g, res in zip(members, out):
                yield bs, list(groups[g]), res


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


def merge_into(
    values: np.ndarray, order: np.ndarray, new_values: np.ndarray, new_order: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """numpy: the best ``k`` so far (``values`` (rows, k), NaN: none; ``order`` (rows, k, n_keys)) merged with a
    block's candidates (``new_values`` (rows, m), ``new_order``) by :func:`merge_top` -> the new best ``k`` (rows,
    k) and their order, NaN / -1 past the candidates. Folding blocks one at a time gives the top ``k`` of all."""
    vals = np.concatenate([values, new_values], 1)
    at = np.concatenate([order, new_order], 1)
    best = merge_top(vals, at, k)
    ok = best >= 0
    rows = np.arange(vals.shape[0])[:, None]
    out_v = np.where(ok, vals[rows, np.maximum(best, 0)], np.nan).astype(values.dtype)
    out_at = np.where(ok[..., None], at[rows, np.maximum(best, 0)], -1).astype(order.dtype)
    return out_v, out_at


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
