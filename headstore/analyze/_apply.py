"""``apply_blocks``: ``xr.apply_ufunc(..., dask="parallelized")`` without dask's copy of every input block.

dask's ``apply_gufunc`` (behind ``apply_ufunc``) hands a kernel each input's blocks along its core dims
concatenated (``blockwise(concatenate=True)``), and ``concatenate3`` copies even a single block: a kernel over a
stored ``pattern`` shard got a fresh copy of it, and of ``W_U``, on every call. Here the same kernel receives
the blocks themselves (``concatenate=False``): each input is rechunked to one chunk along its core dims first,
which is no work where the store already holds it so (a shard, a weight), and each block reaches the kernel
as dask read it, shaped exactly as ``apply_ufunc`` would shape it (loop dims first, a size-1 axis for a loop
dim the input lacks, core dims last in the order given).
"""

from __future__ import annotations

import operator
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr


def _single(x: Any) -> Any:
    """A block from ``blockwise(concatenate=False)``: nested one-element lists (one per contracted index) around
    the array."""
    while isinstance(x, list):
        (x,) = x
    return x


def _blockwise(
    func: Callable[..., Any],
    arrays: Sequence[Any],
    n_core: Sequence[int],
    out_core: Sequence[Sequence[int]],
    out_dtypes: Sequence[Any],
    kwargs: dict[str, Any],
) -> tuple[Any, ...]:
    """The dask graph: one ``func`` call per block of the loop dims, its outputs split by ``getitem``."""
    import dask.array as da

    n_loop = max(a.ndim - c for a, c in zip(arrays, n_core, strict=True))
    letters = iter(string.ascii_letters[n_loop:])
    loop = string.ascii_letters[:n_loop]
    arrays = [da.asarray(a) for a in arrays]
    full = [0] * n_loop  # each loop dim's size where some input has it (its inputs of size 1 are broadcast)
    for a, c in zip(arrays, n_core, strict=True):
        for i in range(a.ndim - c):
            j = n_loop - (a.ndim - c) + i
            full[j] = max(full[j], a.shape[i])
    pairs: list[Any] = []
    shapes = []  # per input: the axes to restore (size-1 loop axes it was given for a dim it lacks)
    for a, c in zip(arrays, n_core, strict=True):
        lead = a.ndim - c  # its loop axes: the last `lead` of the n_loop loop dims
        ones = tuple(i for i in range(lead) if a.shape[i] == 1 and full[n_loop - lead + i] > 1)
        a = a.rechunk({i: -1 for i in range(lead, a.ndim)})  # core dims whole: no-op where stored so
        squeezed = a.squeeze(axis=ones) if ones else a
        ind = "".join(loop[n_loop - lead + i] for i in range(lead) if i not in ones)
        ind += "".join(next(letters) for _ in range(c))
        pairs += [squeezed, ind]
        shapes.append(ones)

    def call(*blocks: Any) -> tuple[Any, ...]:
        got = [np.expand_dims(_single(b), s) if s else _single(b) for b, s in zip(blocks, shapes, strict=True)]
        out = func(*got, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    tmp = da.blockwise(call, loop, *pairs, concatenate=False, dtype=object, meta=np.empty((0,) * n_loop, object))
    outs = []
    for i, (sizes, dtype) in enumerate(zip(out_core, out_dtypes, strict=True)):
        chunks = tmp.chunks + tuple((s,) for s in sizes)
        new_axis = list(range(n_loop, n_loop + len(sizes)))
        meta = np.empty((0,) * len(chunks), dtype)
        outs.append(tmp.map_blocks(operator.itemgetter(i), dtype=dtype, chunks=chunks, new_axis=new_axis, meta=meta))
    return tuple(outs)


def apply_blocks(
    func: Callable[..., Any],
    *args: xr.DataArray,
    input_core_dims: Sequence[Sequence[str]],
    output_core_dims: Sequence[Sequence[str]],
    output_dtypes: Sequence[Any],
    output_sizes: dict[str, int] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``xr.apply_ufunc(func, *args, input_core_dims=..., output_core_dims=..., dask="parallelized", ...)``: the
    same blocks, shapes and result, each input block handed to ``func`` as read (no concatenation copy). In
    memory (no dask input) ``func`` runs once on the whole arrays. Returns one DataArray per output core dims
    (a tuple when there are several)."""
    kwargs = kwargs or {}
    sizes = {d: n for a in args for d, n in a.sizes.items()} | (output_sizes or {})
    n_core = [len(c) for c in input_core_dims]
    out_core = [[sizes[d] for d in dims] for dims in output_core_dims]

    def run(*arrays: Any) -> Any:
        if not any(getattr(a, "chunks", None) is not None and not isinstance(a, np.ndarray) for a in arrays):
            return func(*arrays, **kwargs)
        outs = _blockwise(func, arrays, n_core, out_core, output_dtypes, kwargs)
        return outs if len(outs) > 1 else outs[0]

    return xr.apply_ufunc(
        run,
        *args,
        input_core_dims=[list(c) for c in input_core_dims],
        output_core_dims=[list(c) for c in output_core_dims],
        dask="allowed",
    )


def store_blocks(ds: xr.Dataset, name: str, layers: int = 1) -> Callable[[xr.DataArray], xr.DataArray]:
    """A rechunker onto the blocks of ``ds[name]`` as stored: the store's batch chunks (``tokens``'), and along
    ``layer`` the field's own dask blocks (a shard's layers when sharded, one when chunked or derived), so the
    kernel reads each stored block whole and once; ``layers`` a block where the field is in memory. Every other
    dim whole."""
    batch = ds["tokens"].chunksizes.get("batch", ds.sizes["batch"])
    along = ds[name].chunksizes.get("layer") or layers

    def block(x: xr.DataArray) -> xr.DataArray:
        return x.chunk({d: (batch if d == "batch" else along if d == "layer" else -1) for d in x.dims})

    return block


VOCAB_BLOCK_BYTES = 1 << 27  # a block's (tokens, d_vocab) float32 logits: the store's batch chunks grouped to 128 MiB
VOCAB_ROW_TILE = 32  # token rows of vocabulary-sized work at a time in a block: 32 x 49,152 float32 = 6 MiB, in L3


def vocab_rows(ds: xr.Dataset) -> int:
    """Sequences per block of a vocabulary-sized kernel: the store's batch chunks grouped while a block's
    ``(batch, pos, d_vocab)`` float32 logits fit ``VOCAB_BLOCK_BYTES``, so per-head work over ``d_vocab``
    (``W_O[L, h] @ W_U``) is shared by more tokens; at least one stored chunk."""
    chunk = ds["tokens"].chunksizes.get("batch", (ds.sizes["batch"],))[0]
    per_chunk = chunk * ds.sizes["pos"] * ds.sizes["d_vocab"] * 4
    return int(chunk * max(1, VOCAB_BLOCK_BYTES // per_chunk))
