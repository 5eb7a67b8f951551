"""Reads that fail on a damaged chunk (zarr's bare ``ValueError: Stored and computed checksum do not match``, a
torn shard) become a ``HeadstoreError`` naming the store, the array and the chunk, and saying to run validate.
String arrays stored as bytes and offsets (``headstore.store_schema.strings``) read back as strings."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.read.codec_pipeline import read_chunks, with_fast_reads
from headstore.store_schema.strings import STRING_ATTR, decode


def chunk_label(arr: zarr.Array, key: Any) -> str:
    """The chunk (or range of chunks along each dim, ``a-b``) that ``arr[key]`` reads: ``0.3.0.0``, ``0-1.0-5``."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (arr.ndim - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (arr.ndim - len(key))
    parts = []
    for k, c, n in zip(key, arr.chunks, arr.shape, strict=False):
        if isinstance(k, slice):
            start, stop, _ = k.indices(n)
            lo, hi = start // c, max(start, stop - 1) // c
        elif isinstance(k, (int, np.integer)):
            lo = hi = (int(k) % n if n else 0) // c
        else:
            idx = np.asarray(k).ravel()
            lo, hi = (int(idx.min()) // c, int(idx.max()) // c) if idx.size else (0, 0)
        parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return ".".join(parts)


def damaged(store: str, name: str, arr: zarr.Array, key: Any, e: Exception) -> HeadstoreError:
    """The one-line error for a failed read of ``arr[key]`` (array ``name`` of ``store``)."""
    label = chunk_label(arr, key)
    first = (str(e).splitlines() or [""])[0][:100]
    return HeadstoreError(
        f"{store}: array {name!r} has a damaged chunk ({'chunks' if '-' in label else 'chunk'} {label}): "
        f"{type(e).__name__}: {first}; run `headstore validate {store}` to list damaged chunks, then re-extract"
    )


class GuardedArray:
    """Array-like over one zarr array whose failed reads raise ``damaged``; ``fast``: whole-shard reads go through
    zarrs where it serves (``codec_pipeline.with_fast_reads``)."""

    def __init__(self, arr: zarr.Array, name: str, store: str, *, fast: bool = False):
        self.arr, self.name, self.store = arr, name, store
        self.source = with_fast_reads(arr) if fast else arr
        self.shape, self.dtype, self.ndim = tuple(arr.shape), arr.dtype, arr.ndim
        self.chunks = arr.chunks

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.source[key]
        except Exception as e:
            raise damaged(self.store, self.name, self.arr, key, e) from e


class GuardedStrings:
    """Array-like (n,) over a string array stored as ``NAME_bytes`` and ``NAME_offsets``: a read decodes it whole
    (one chunk each), as numpy StringDType; ``dims`` the string array's, ``stored`` the two arrays' names."""

    def __init__(self, data: zarr.Array, offsets: zarr.Array, spec: dict[str, Any], store: str):
        self.name, self.dims, self.stored = str(spec["name"]), tuple(spec["dims"]), (data.basename, offsets.basename)
        self.data = GuardedArray(data, data.basename, store)
        self.offsets = GuardedArray(offsets, offsets.basename, store)
        self.shape, self.ndim, self.dtype = (max(0, offsets.shape[0] - 1),), 1, np.dtypes.StringDType()
        self.chunks = self.shape

    def __getitem__(self, key: Any) -> Any:
        return decode(self.data[...], self.offsets[...])[key]


def stored_strings(root: zarr.Group, store: str) -> dict[str, GuardedStrings]:
    """The string arrays of ``root`` stored as bytes and offsets, by their names (a schema 1 store: none)."""
    out = {}
    for name, arr in root.arrays():
        spec = arr.attrs.get(STRING_ATTR)
        if not isinstance(spec, dict):
            continue
        data = root.get(str(spec.get("bytes")))
        if not isinstance(data, zarr.Array) or not isinstance(spec.get("name"), str):
            raise HeadstoreError(f"{store}: the string array {name!r} lacks its bytes array: the store is damaged")
        out[spec["name"]] = GuardedStrings(data, arr, spec, store)
    return out


def guarded_arrays(root: zarr.Group, store: str) -> dict[str, GuardedArray | GuardedStrings]:
    """Every array of ``root``, each guarded; string arrays stored as bytes and offsets by their own names."""
    strings = stored_strings(root, store)
    hidden = {name for s in strings.values() for name in s.stored}
    plain = {name: GuardedArray(a, name, store) for name, a in root.arrays() if name not in hidden}
    return {**plain, **strings}


def lazy_dataset(root: zarr.Group, store: str, inner: frozenset[str] = frozenset()) -> xr.Dataset:
    """``root`` (already open: no second metadata read) as a lazy Dataset, as ``xr.open_zarr(chunks={})``
    presents it, each array's reads guarded (``damaged``), string arrays stored as bytes and offsets as the
    string variables they hold. Dask blocks: whole shards of a sharded array (``codec_pipeline.read_chunks``),
    except for the arrays named in ``inner``, which keep the stored (inner) chunks."""
    import dask.array as da
    from xarray.backends.zarr import ZarrStore

    ds = xr.open_dataset(ZarrStore(root, use_zarr_fill_value_as_mask=False), engine="store", chunks={})
    for name in list(ds.variables):
        var, arr = ds[name], root.get(str(name))
        if not isinstance(arr, zarr.Array) or var.chunks is None or var.dtype != arr.dtype or var.shape != arr.shape:
            continue
        guarded = GuardedArray(arr, str(name), store, fast=True)
        by_batch = bool(var.dims) and var.dims[0] == "batch"
        chunks = var.data.chunks if name in inner else read_chunks(arr, var.data.chunks, by_batch=by_batch)
        data = da.from_array(guarded, chunks=chunks, name=False, meta=np.empty((0,) * arr.ndim, arr.dtype))
        ds[name] = var.copy(data=data)
    strings = stored_strings(root, store)
    ds = ds.drop_vars([name for s in strings.values() for name in s.stored])
    for name, s in strings.items():
        data = da.from_array(s, chunks=-1, name=False, meta=np.empty((0,), s.dtype))
        ds[name] = xr.Variable(s.dims, data)
    return ds
