"""Create a store: the chunk, shard and codec rules, and every array preallocated with inputs and weights written."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from headstore.store_schema.arrays import ArraySpec, codecs, store_layout, whole_shard
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, WEIGHTS
from headstore.store_schema.provenance import Provenance
from headstore.store_schema.strings import STRING_ATTR, encode, is_text, stored_names
from headstore.store_schema.write import checkpoint
from headstore.store_schema.write.durable import sync_folder, sync_tree


def create_store(
    path: str | os.PathLike[str],
    prov: Provenance,
    sizes: Mapping[str, int],
    tokens: np.ndarray,
    columns: Mapping[str, np.ndarray],
    weights: Mapping[str, np.ndarray],
) -> None:
    """Preallocate every array at its final shape and write inputs and weights.

    Written under a temporary name beside ``path`` and renamed into place, so a crash leaves
    nothing at ``path``.
    """
    path = Path(path)
    if path.exists():
        raise HeadstoreError(f"{path} already exists: choose a new --out or resume with the same command")
    _remove_dead_tmp(path)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        root.attrs[ATTRS_KEY] = prov.to_dict()
        n = tokens.shape[0]
        create_arrays(root, store_layout(prov, sizes).values())
        tok_arr = root["tokens"]
        assert isinstance(tok_arr, zarr.Array)
        tok_arr[:] = tokens.astype(np.int32)
        write_columns(root, columns, n)
        write_weights(root, weights, prov.layout)
        consolidate(str(tmp))
        sync_tree(tmp)
        checkpoint.reached("create:before_rename")
        try:
            os.rename(tmp, path)
        except OSError as e:  # another process (a concurrent shard) renamed its copy into place first
            if path.exists():
                raise HeadstoreError(f"{path} already exists (created concurrently by another process)") from e
            raise
        sync_folder(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _remove_dead_tmp(path: Path) -> None:
    """Delete creation folders left beside ``path`` by killed processes of this host (a live one,
    e.g. a concurrent shard creating the same store, keeps its folder)."""
    prefix = _tmp_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix) :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def consolidate(store: Any) -> None:
    """Consolidate a store's metadata (one read opens it, also over HTTP): zarr warns that v3 does not
    specify consolidation yet; headstore chose it knowingly, so the warning is not passed to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store)


def write_columns(root: zarr.Group, columns: Mapping[str, np.ndarray], n: int) -> None:
    """Per-sequence metadata columns, one chunk each (string columns as bytes and offsets: ``write_strings``)."""
    for col, values in columns.items():
        arr = np.asarray(values)
        if is_text(arr.dtype):
            write_strings(root, col, arr, ("batch",), taken=set(columns) - {col})
            continue
        a = root.create_array(
            col, shape=(n,), chunks=(n,), dtype=arr.dtype, dimension_names=("batch",),
            compressors=codecs(col, arr.dtype), config={"write_empty_chunks": True},
        )  # fmt: skip
        a[:] = arr


def write_strings(
    root: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...], *, taken: Iterable[str] = (),
    write: bool = True,
) -> None:  # fmt: skip
    """The 1-D string array ``name`` as ``NAME_bytes`` (uint8 UTF-8) and ``NAME_offsets`` (int64, n + 1), one
    chunk each (``headstore.store_schema.strings``); refused when a column of ``taken`` has either name."""
    names = stored_names(name)
    clash = sorted(set(names) & set(taken))
    if clash:
        raise HeadstoreError(
            f"string column {name!r} is stored as {names[0]} and {names[1]}, and {clash[0]!r} is another column: "
            "rename one of them"
        )
    data, offsets = encode(values)
    attrs: dict[str, Any] = {STRING_ATTR: {"name": name, "dims": list(dims), "bytes": names[0]}}
    for aname, value, dim, extra in ((names[0], data, "byte", {}), (names[1], offsets, "offset", attrs)):
        a = root.create_array(
            aname, shape=value.shape, chunks=(max(1, value.size),), dtype=value.dtype,
            dimension_names=(f"{name}_{dim}",), compressors=codecs(aname, value.dtype), attributes=extra,
            config={"write_empty_chunks": True},
        )  # fmt: skip
        if write:
            a[...] = value


def write_weights(root: zarr.Group, weights: Mapping[str, np.ndarray], layout: str, *, write: bool = True) -> None:
    """Weights (and ``vocab``) as arrays of ``root``: one chunk per layer of per-layer weights (one
    shard file for all layers when ``layout="sharded"``), whole otherwise. ``write=False``: the arrays'
    metadata only (what ``headstore.extract.plan`` measures)."""
    for wname, value in weights.items():
        dims = WEIGHTS[wname].dims if wname in WEIGHTS else ("d_vocab",)
        if is_text(value.dtype):  # vocab
            write_strings(root, wname, value, dims, write=write)
            continue
        chunks = tuple(1 if d == "layer" else s for d, s in zip(dims, value.shape, strict=True))
        a = root.create_array(
            wname, shape=value.shape, chunks=chunks, shards=whole_shard(value.shape, chunks, layout),
            dtype=value.dtype, dimension_names=dims, compressors=codecs(wname, value.dtype),
            config={"write_empty_chunks": True},
        )  # fmt: skip
        if write:
            a[...] = value


def create_arrays(root: zarr.Group, specs: Iterable[ArraySpec]) -> None:
    """Preallocate each array of ``specs`` in ``root`` (nothing written: missing chunks read as the fill)."""
    for spec in specs:
        root.create_array(
            spec.name,
            shape=spec.shape,
            chunks=spec.chunks,
            shards=spec.shards,
            dtype=spec.dtype,
            fill_value=spec.fill_value,
            dimension_names=spec.dims,
            compressors=spec.compressors,
            config={"write_empty_chunks": True},
        )
