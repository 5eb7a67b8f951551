"""Open a store read-only: provenance, completion, and the lazy Dataset with derived fields and guarded reads."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.attention import derived_pattern
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, MANIFEST
from headstore.store_schema.provenance import Provenance


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def read_provenance(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Provenance:
    root = _open_group(path, storage_options)
    return Provenance.from_dict(root.attrs.get(ATTRS_KEY))


def _open_group(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> zarr.Group:
    try:
        root = zarr.open_group(
            str(path), mode="r", zarr_format=3, storage_options=storage_options if not _is_local(str(path)) else None
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as e:
        raise HeadstoreError(
            f"{path} is not a Zarr v3 store ({type(e).__name__}): pass the folder made by extract"
        ) from e
    if ATTRS_KEY not in root.attrs:
        raise HeadstoreError(f"{path} is a Zarr store but not a headstore store (no '{ATTRS_KEY}' attrs)")
    return root


def done_mask(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Boolean (batch,) array: which sequences are completely written. A damaged chunk counts as not done."""
    root = _open_group(path, storage_options)
    arr = root[MANIFEST]
    assert isinstance(arr, zarr.Array)
    out = np.zeros(arr.shape[0], dtype=bool)
    (step,) = arr.chunks
    for start in range(0, arr.shape[0], step):
        try:
            out[start : start + step] = np.asarray(arr[start : start + step]) == 1
        except Exception:  # a torn manifest chunk (crash mid-write): that batch is redone
            out[start : start + step] = False
    return out


def pattern_layer_index(prov: Provenance) -> list[int]:
    """Positions along ``layer`` (not model layer numbers) whose ``pattern`` chunks are written."""
    stored = set(prov.stored_pattern_layers)
    return [i for i, L in enumerate(prov.layers) if L in stored]


def open_store(
    path: str | os.PathLike[str],
    *,
    partial: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Open a store lazily (dask-backed), read-only.

    Checks the schema; adds the coordinates ``batch`` (each sequence's number in the store, which
    ``partial=True`` and any ``isel`` keep), ``layer`` (model layer numbers) and ``head``; the derived
    ``result = z @ W_O`` when ``result`` was not materialised, and the derived ``pattern =
    softmax(q . k / sqrt(d_head))`` (causal) when ``pattern`` was not stored but ``q`` and ``k`` were
    (``--fields compact``). With ``--pattern-layers``, the layers whose pattern was not stored read as
    NaN, or are derived the same way when ``q`` and ``k`` were stored (the whole ``pattern`` is then
    float32). An incomplete store is refused unless ``partial=True``, which keeps only the completed
    sequences (their ``batch`` labels say which).
    """
    prov = read_provenance(path, storage_options)
    if prov.layout == "sharded" and str(path).startswith(("http://", "https://")):
        _check_range_requests(str(path), storage_options)
    done = done_mask(path, storage_options)
    opts = None if _is_local(str(path)) else storage_options
    ds = xr.open_zarr(str(path), chunks={}, consolidated=True, storage_options=opts, zarr_format=3)
    ds = ds.drop_vars(MANIFEST)
    missing = [name for name in prov.fields if name not in ds]
    if missing:
        raise HeadstoreError(f"store lacks {', '.join(missing)} that its attrs list: the store is damaged")
    ds = _guard_reads(ds, _open_group(path, storage_options), prov.fields, str(path))
    if prov.weights_store is not None:  # W_E, W_U, ... from the shared weights store, hash verified
        from headstore.store_schema.weights_store import open_weights

        wds = open_weights(str(path), prov.weights_store, storage_options)
        for name in wds.data_vars:
            ds[name] = wds[name]
    ds = ds.assign_coords(_coordinates(ds, prov))
    if "result" not in ds and "z" in ds and "W_O" in ds:
        ds["result"] = derived_result(ds["z"], ds["W_O"])
    if "pattern" not in ds and "q" in ds and "k" in ds:
        ds["pattern"] = derived_pattern(ds["q"], ds["k"], prov.model_config)
    elif "pattern" in ds and "q" in ds and "k" in ds and len(prov.stored_pattern_layers) < len(prov.layers):
        ds["pattern"] = _fill_unstored_pattern(ds, pattern_layer_index(prov), prov)
    if not done.all():
        if not partial:
            raise HeadstoreError(
                f"{path} is incomplete ({int(done.sum())} of {done.size} sequences written): rerun the extract "
                "command to finish it, or analyse the complete part with --partial"
            )
        ds = ds.isel(batch=np.flatnonzero(done))
    ds.attrs[ATTRS_KEY] = prov.to_dict()
    return ds


def _coordinates(ds: xr.Dataset, prov: Provenance) -> dict[str, tuple[str, np.ndarray]]:
    """Labels that survive ``isel``: ``batch`` the sequence's number in the store (so a partial store or a
    subset says which sequences it holds), ``layer`` the model's layer numbers, ``head`` the query heads."""
    coords = {
        "batch": ("batch", np.arange(ds.sizes["batch"], dtype=np.int64)),
        "layer": ("layer", np.asarray(prov.layers, dtype=np.int64)),
        "head": ("head", np.arange(prov.model_config.n_heads, dtype=np.int64)),
    }
    return {name: c for name, c in coords.items() if name in ds.dims}


def _check_range_requests(url: str, storage_options: dict[str, Any] | None) -> None:
    """Sharded stores are read in byte ranges: refuse a server that answers a range with the whole file
    (Python's ``http.server``), whose shards would otherwise read as damaged."""
    import fsspec

    fs = fsspec.filesystem(url.split("://")[0], **(storage_options or {}))
    got = fs.cat_file(f"{url.rstrip('/')}/zarr.json", start=0, end=2)
    if len(got) != 2:
        raise HeadstoreError(
            f"{url}: the server ignores HTTP Range requests, which a sharded store is read with: serve it with "
            "`headstore serve FOLDER` or any server that honours ranges (nginx, caddy, S3, the Hugging Face Hub)"
        )


def _fill_unstored_pattern(ds: xr.Dataset, stored: list[int], prov: Provenance) -> xr.DataArray:
    """``pattern`` with the layers not stored (``--pattern-layers``) derived from ``q``, ``k`` (float32)."""
    missing = [i for i in range(ds.sizes["layer"]) if i not in stored]
    derived = derived_pattern(ds["q"].isel(layer=missing), ds["k"].isel(layer=missing), prov.model_config)
    pat = ds["pattern"].astype("float32")
    parts = [
        pat.isel(layer=[i]) if i in stored else derived.isel(layer=[missing.index(i)]) for i in range(ds.sizes["layer"])
    ]
    return xr.concat(parts, dim="layer")


class _GuardedArray:
    """Array-like over one zarr array: a failed chunk read becomes a HeadstoreError naming the array."""

    def __init__(self, arr: zarr.Array, name: str, path: str):
        self.arr, self.name, self.path = arr, name, path
        self.shape, self.dtype, self.ndim = tuple(arr.shape), arr.dtype, arr.ndim

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.arr[key]
        except Exception as e:
            k0 = key[0] if isinstance(key, tuple) and key else None
            where = f" (sequences {k0.start}-{k0.stop})" if isinstance(k0, slice) else ""
            first = (str(e).splitlines() or [""])[0][:100]
            raise HeadstoreError(
                f"{self.path}: array {self.name!r} has a damaged chunk{where}: {type(e).__name__}: {first}; "
                "run headstore validate to list damaged chunks, then re-extract"
            ) from e


def _guard_reads(ds: xr.Dataset, root: zarr.Group, names: tuple[str, ...], path: str) -> xr.Dataset:
    """Re-point each dask-backed field at a ``_GuardedArray`` (same chunks, same dtype)."""
    import dask.array as da

    for name in names:
        var, arr = ds[name], root[name]
        if not isinstance(arr, zarr.Array) or var.chunks is None or var.dtype != arr.dtype or var.shape != arr.shape:
            continue
        guarded = _GuardedArray(arr, name, path)
        data = da.from_array(guarded, chunks=var.data.chunks, name=False, meta=np.empty((0,) * arr.ndim, arr.dtype))
        ds[name] = var.copy(data=data)
    return ds


def derived_result(z: xr.DataArray, W_O: xr.DataArray) -> xr.DataArray:
    """``result[batch, layer, pos, head, d_model] = sum_d_head z * W_O`` (float32)."""
    out = xr.dot(z.astype("float32"), W_O.astype("float32"), dim="d_head")
    out = out.transpose("batch", "layer", "pos", "head", "d_model")
    if z.chunks is not None:  # keep z's chunking (dask's einsum may split it further)
        out = out.chunk({d: z.chunksizes[d] for d in ("batch", "layer", "pos", "head")} | {"d_model": -1})
    return out


def provenance(ds: xr.Dataset) -> Provenance:
    """The Provenance of a dataset returned by ``open_store``."""
    return Provenance.from_dict(ds.attrs.get(ATTRS_KEY))
