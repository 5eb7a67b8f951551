"""Open a store read-only: provenance, completion, and the lazy Dataset with derived fields and guarded reads."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.attention import derived_pattern, derived_z, pattern_layer_index
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, MANIFEST
from headstore.store_schema.paths import StorePath
from headstore.store_schema.provenance import Provenance
from headstore.store_schema.read.guard import lazy_dataset
from headstore.store_schema.read.weights import open_weights


def open_group(path: str | os.PathLike[str] | StorePath, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """A store's root group, read-only, its metadata read once (consolidated: every array's with it)."""
    where = StorePath.of(path, storage_options)
    try:
        root = where.open_group()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as e:
        raise HeadstoreError(
            f"{where} is not a Zarr v3 store ({type(e).__name__}): pass the folder made by extract"
        ) from e
    if ATTRS_KEY not in root.attrs:
        raise HeadstoreError(f"{where} is a Zarr store but not a headstore store (no '{ATTRS_KEY}' attrs)")
    return root


def read_provenance(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Provenance:
    return Provenance.from_dict(open_group(path, storage_options).attrs.get(ATTRS_KEY))


def done_mask(path: str | os.PathLike[str] | zarr.Group, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Boolean (batch,) array: which sequences are completely written. A damaged chunk counts as not done.
    ``path`` may be the store's open root group."""
    root = path if isinstance(path, zarr.Group) else open_group(path, storage_options)
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
    (``--fields compact``, and ``auto`` at long contexts), then ``z = pattern @ v`` when ``z`` was not stored
    (``--fields auto``, float32). With ``--pattern-layers``, the layers whose pattern was not stored read as
    NaN, or are derived the same way when ``q`` and ``k`` were stored (the whole ``pattern`` is then
    float32). An incomplete store is refused unless ``partial=True``, which keeps only the completed
    sequences (their ``batch`` labels say which).
    """
    where = StorePath.of(path, storage_options)
    root = open_group(where)
    prov = Provenance.from_dict(root.attrs.get(ATTRS_KEY))
    if prov.layout == "sharded" and where.http:
        _check_range_requests(where, root)
    done = done_mask(root)
    ds = lazy_dataset(root, where.url, _per_layer_reads(prov)).drop_vars(MANIFEST)
    missing = [name for name in prov.fields if name not in ds]
    if missing:
        raise HeadstoreError(f"store lacks {', '.join(missing)} that its attrs list: the store is damaged")
    if prov.weights_store is not None:  # W_E, W_U, ... from the shared weights store: its metadata checked
        sizes: dict[str, int] = {d: int(prov.config[d]) for d in ("d_vocab", "d_model", "n_ctx") if d in prov.config}
        wds = open_weights(where.url, prov.weights_store, storage_options, sizes)
        for name in wds.data_vars:
            ds[name] = wds[name]
    ds = ds.assign_coords(_coordinates(ds, prov))
    if "pattern" not in ds and "q" in ds and "k" in ds:
        ds["pattern"] = derived_pattern(ds["q"], ds["k"], prov.model_config)
    elif "pattern" in ds and "q" in ds and "k" in ds and len(prov.stored_pattern_layers) < len(prov.layers):
        ds["pattern"] = _fill_unstored_pattern(ds, pattern_layer_index(prov), prov)
    if "z" not in ds and "pattern" in ds and "v" in ds:  # --fields auto: z = pattern @ v
        ds["z"] = derived_z(ds["pattern"], ds["v"])
    if "result" not in ds and "z" in ds and "W_O" in ds:
        ds["result"] = derived_result(ds["z"], ds["W_O"])
    if not done.all():
        if not partial:
            raise HeadstoreError(
                f"{path} is incomplete ({int(done.sum())} of {done.size} sequences written): rerun the extract "
                "command to finish it, or analyse the complete part with --partial"
            )
        ds = ds.isel(batch=np.flatnonzero(done))
    ds.attrs[ATTRS_KEY] = prov.to_dict()
    return ds


def _per_layer_reads(prov: Provenance) -> frozenset[str]:
    """The fields read one layer a block (their stored inner chunks) rather than one shard a block: ``q``, ``k``
    and ``v`` where ``pattern`` is derived (``derived_pattern`` makes one float32 layer a block, which a whole
    shard of several layers would be split into, and dask would then hold every shard read until its last
    layer is used: memory that grows with the store)."""
    derived = "pattern" not in prov.fields or len(prov.stored_pattern_layers) < len(prov.layers)
    return frozenset({"q", "k", "v"}) if derived and {"q", "k"} <= set(prov.fields) else frozenset()


def _coordinates(ds: xr.Dataset, prov: Provenance) -> dict[str, tuple[str, np.ndarray]]:
    """Labels that survive ``isel``: ``batch`` the sequence's number in the store (so a partial store or a
    subset says which sequences it holds), ``layer`` the model's layer numbers, ``head`` the query heads."""
    coords = {
        "batch": ("batch", np.arange(ds.sizes["batch"], dtype=np.int64)),
        "layer": ("layer", np.asarray(prov.layers, dtype=np.int64)),
        "head": ("head", np.arange(prov.model_config.n_heads, dtype=np.int64)),
    }
    return {name: c for name, c in coords.items() if name in ds.dims}


def _check_range_requests(where: StorePath, root: zarr.Group) -> None:
    """Sharded stores are read in byte ranges: refuse a server that answers a range with the whole file
    (Python's ``http.server``), whose shards would otherwise read as damaged. Asks for two bytes of the
    ``tokens`` chunk written at creation (data, not metadata: the store's metadata is read once)."""
    import fsspec

    tokens = root["tokens"]
    assert isinstance(tokens, zarr.Array)
    key = tokens.metadata.encode_chunk_key((0,) * tokens.ndim)
    with where.needs_packages():
        fs = fsspec.filesystem(where.url.split("://")[0], **(where.storage_options or {}))
    got = fs.cat_file(f"{where.url.rstrip('/')}/tokens/{key}", start=0, end=2)
    if len(got) != 2:
        raise HeadstoreError(
            f"{where}: the server ignores HTTP Range requests, which a sharded store is read with: serve it with "
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
    return xr.concat(parts, dim="layer").chunk({"layer": pat.chunksizes["layer"]})  # the stored blocks (shards)


def derived_result(z: xr.DataArray, W_O: xr.DataArray) -> xr.DataArray:
    """``result[batch, layer, pos, head, d_model] = sum_d_head z * W_O`` (float32), one task per ``z`` chunk.

    A blockwise product on ``z``'s chunks (``d_head`` is whole in both): its graph is one lazy layer whatever the
    store's size, where ``xr.dot``'s rechunks built a task dict per chunk when the store was opened."""
    out = xr.apply_ufunc(
        _result_block, z, W_O, input_core_dims=[["d_head"], ["d_head", "d_model"]], output_core_dims=[["d_model"]],
        dask="parallelized", output_dtypes=[np.float32], dask_gufunc_kwargs={"output_sizes": {"d_model": W_O.sizes["d_model"]}},
    )  # fmt: skip
    return out.transpose("batch", "layer", "pos", "head", "d_model")


def _result_block(z: np.ndarray, w_o: np.ndarray) -> np.ndarray:
    """numpy: z (batch, layer, pos, head, d_head) and w_o ([1,] layer, 1, head, d_head, d_model: broadcast by
    apply_ufunc) -> (batch, layer, pos, head, d_model), as ``xr.dot`` computes it (``np.einsum`` over (layer, head,
    batch, pos, d_head) views)."""
    zt = z.astype(np.float32).transpose(1, 3, 0, 2, 4)
    w = w_o.reshape((1,) * (6 - w_o.ndim) + w_o.shape)[0, :, 0]  # layer, head, d_head, d_model
    out = np.einsum("...abc,...cd->...abd", zt, w.astype(np.float32), dtype=np.float32)
    return out.transpose(2, 0, 3, 1, 4)


def provenance(ds: xr.Dataset) -> Provenance:
    """The Provenance of a dataset returned by ``open_store``."""
    return Provenance.from_dict(ds.attrs.get(ATTRS_KEY))
