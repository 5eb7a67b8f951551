"""Create a store: the chunk, shard and codec rules, and every array preallocated with inputs and weights written."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from headstore.store_schema.crash import _test_kill
from headstore.store_schema.durable import sync_folder, sync_tree
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, FIELDS, MANIFEST, WEIGHTS
from headstore.store_schema.provenance import Provenance

ZSTD_LEVEL = 1


def _codecs(name: str, dtype: Any) -> list[Any]:
    """Compressor by measurement (docs/benchmarks.md, storage): every chunk ends in a crc32c checksum.

    - ``pattern``: LZ4 level 1 (Blosc, no shuffle): half of it is causal zeros; 1.9x at ~5 GB/s vs Zstd-1's
      2.1x at ~0.7 GB/s, and several times faster to decode; level 5 gains under 1 % at half the speed.
    - other float arrays (activations and weights): none; Zstd gains only ~8 % on them at ~0.6 GB/s,
      which cost the extraction ~0.4 s of CPU per 1,000 SmolLM2 tokens.
    - integers and strings (tokens, columns, vocab): Zstd level 1.
    """
    if name == "pattern":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"), Crc32cCodec()]
    if np.dtype(dtype).kind == "f":
        return [Crc32cCodec()]
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def field_dtype(name: str, storage_dtype: str) -> str:
    dt = FIELDS[name].dtype
    return storage_dtype if dt == "storage" else dt


def field_chunks(dims: tuple[str, ...], sizes: Mapping[str, int], batch_size: int) -> tuple[int, ...]:
    """Chunk rule: ``batch_size`` along batch, one layer along layer, whole along the rest."""
    return tuple(batch_size if d == "batch" else 1 if d == "layer" else sizes[d] for d in dims)


def field_shards(
    dims: tuple[str, ...], sizes: Mapping[str, int], batch_size: int, layout: str
) -> tuple[int, ...] | None:
    """Shard rule (``layout="sharded"``, per-layer fields): ``batch_size`` along batch, whole along the
    rest, so one batch of a field is one file holding every layer's inner chunk. None: not sharded."""
    if layout != "sharded" or "layer" not in dims:
        return None
    return tuple(batch_size if d == "batch" else sizes[d] for d in dims)


def _whole_shard(shape: tuple[int, ...], chunks: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """Written-once arrays (tokens, per-layer weights) in a sharded store: one shard file for the whole
    array, inner chunks as in a chunked store."""
    shard = tuple(-(-s // c) * c for s, c in zip(shape, chunks, strict=True))
    return shard if layout == "sharded" and shard != tuple(chunks) else None


def _fill(dtype: str) -> Any:
    return np.nan if np.dtype(dtype).kind == "f" else 0


def store_sizes(cfg: Mapping[str, Any], prov: Provenance, n_sequences: int) -> dict[str, int]:
    """Dim sizes of a store from its config."""
    return {
        "batch": n_sequences,
        "pos": prov.seq_len,
        "query_pos": prov.seq_len,
        "key_pos": prov.seq_len,
        "layer": len(prov.layers),
        "head": int(cfg["n_heads"]),
        "kv_head": int(cfg["n_key_value_heads"]),
        "d_head": int(cfg["d_head"]),
        "d_model": int(cfg["d_model"]),
        "d_vocab": int(cfg["d_vocab"]),
        "n_ctx": int(cfg["n_ctx"]),
        "d_rot": int(cfg["d_head"]),
    }


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
        for name in prov.fields:
            f = FIELDS[name]
            dtype = field_dtype(name, prov.storage_dtype)
            _create(root, name, f.dims, dtype, sizes, prov.batch_size, prov.layout)
        _create(root, MANIFEST, ("batch",), "uint8", sizes, prov.batch_size, "chunked")  # one file per batch
        tok_arr = root["tokens"]
        assert isinstance(tok_arr, zarr.Array)
        tok_arr[:] = tokens.astype(np.int32)
        write_columns(root, columns, n)
        write_weights(root, weights, prov.layout)
        consolidate(str(tmp))
        sync_tree(tmp)
        _test_kill("create:before_rename")
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
    """Per-sequence metadata columns, one chunk each."""
    for col, values in columns.items():
        arr = np.asarray(values)
        col_dtype: Any = str if arr.dtype.kind in "UO" else arr.dtype
        a = root.create_array(
            col, shape=(n,), chunks=(n,), dtype=col_dtype, dimension_names=("batch",),
            compressors=_codecs(col, arr.dtype), config={"write_empty_chunks": True},
        )  # fmt: skip
        a[:] = arr


def write_weights(root: zarr.Group, weights: Mapping[str, np.ndarray], layout: str, *, write: bool = True) -> None:
    """Weights (and ``vocab``) as arrays of ``root``: one chunk per layer of per-layer weights (one
    shard file for all layers when ``layout="sharded"``), whole otherwise. ``write=False``: the arrays'
    metadata only (what ``headstore.extract.plan`` measures)."""
    for wname, value in weights.items():
        dims = WEIGHTS[wname].dims if wname in WEIGHTS else ("d_vocab",)
        chunks = tuple(1 if d == "layer" else s for d, s in zip(dims, value.shape, strict=True))
        w_dtype: Any = str if value.dtype.kind in "UO" else value.dtype
        a = root.create_array(
            wname, shape=value.shape, chunks=chunks, shards=_whole_shard(value.shape, chunks, layout),
            dtype=w_dtype, dimension_names=dims, compressors=_codecs(wname, value.dtype),
            config={"write_empty_chunks": True},
        )  # fmt: skip
        if write:
            a[...] = value


def _create(
    root: zarr.Group,
    name: str,
    dims: tuple[str, ...],
    dtype: str,
    sizes: Mapping[str, int],
    batch_size: int,
    layout: str,
) -> None:
    shape = tuple(sizes[d] for d in dims)
    chunks = field_chunks(dims, sizes, batch_size)
    shards = field_shards(dims, sizes, batch_size, layout)
    if name == "tokens":  # written once, at creation
        shards = _whole_shard(shape, chunks, layout)
    root.create_array(
        name,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        fill_value=_fill(dtype),
        dimension_names=dims,
        compressors=_codecs(name, dtype),
        config={"write_empty_chunks": True},
    )
