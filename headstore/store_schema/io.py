"""Create, write, open and validate stores. The only module that touches Zarr directly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from headstore.store_schema.attention import derived_pattern as derived_pattern
from headstore.store_schema.attention import pattern_block as pattern_block
from headstore.store_schema.durable import batch_files, make_durable, sync_folder, sync_tree
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, FIELDS, MANIFEST, WEIGHTS
from headstore.store_schema.provenance import Provenance

ZSTD_LEVEL = 1


# Test-only crash injection (tests/test_reliability.py). When the environment variable is set to
# "create:before_rename", "batch:N:after_field:NAME" or "batch:N:torn_field:NAME" (N = batch index,
# NAME a field or "batch_done"), the process SIGKILLs itself at that point; "torn_field" first cuts
# the batch's first chunk file of NAME in half and leaves a stray ".partial" file beside it, as a
# crash in the middle of a chunk write would. Unset in normal use: costs one dict lookup.
TEST_KILL_ENV = "HEADSTORE_TEST_KILL_AT"


def _test_kill(point: str, batch: tuple[Path, int] | None = None) -> None:
    """``batch``: (field folder, batch index) whose first file "torn_field" cuts."""
    want = os.environ.get(TEST_KILL_ENV)
    if not want or want.replace(":torn_field:", ":after_field:") != point:
        return
    if ":torn_field:" in want and batch is not None:
        first = batch_files(*batch)[0]
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2])
        first.with_suffix(".0123.partial").write_bytes(data[: len(data) // 3])
    os.kill(os.getpid(), signal.SIGKILL)


def _codecs(name: str, dtype: Any) -> list[Any]:
    """Compressor by measurement (docs/benchmarks.md, storage): every chunk ends in a crc32c checksum.

    - ``pattern``: LZ4 (Blosc, no shuffle): half of it is causal zeros; 1.9x at ~1.8 GB/s vs Zstd-1's
      2.1x at ~0.45 GB/s, and ~3x faster to decode.
    - other float arrays (activations and weights): none; Zstd gains only ~8 % on them at ~0.6 GB/s,
      which cost the extraction ~0.4 s of CPU per 1,000 SmolLM2 tokens.
    - integers and strings (tokens, columns, vocab): Zstd level 1.
    """
    if name == "pattern":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()]
    if np.dtype(dtype).kind == "f":
        return [Crc32cCodec()]
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def field_dtype(name: str, storage_dtype: str) -> str:
    dt = FIELDS[name].dtype
    return storage_dtype if dt == "storage" else dt


def field_chunks(dims: tuple[str, ...], sizes: Mapping[str, int], batch_size: int) -> tuple[int, ...]:
    """Chunk rule: ``batch_size`` along batch, one layer along layer, whole along the rest."""
    return tuple(batch_size if d == "batch" else 1 if d == "layer" else sizes[d] for d in dims)


def field_shards(dims: tuple[str, ...], sizes: Mapping[str, int], batch_size: int, layout: str) -> tuple[int, ...] | None:
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


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


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


def read_provenance(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Provenance:
    root = _open_group(path, storage_options)
    return Provenance.from_dict(root.attrs.get(ATTRS_KEY))


def _open_group(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> zarr.Group:
    try:
        root = zarr.open_group(
            str(path), mode="r", zarr_format=3, storage_options=storage_options if not _is_local(str(path)) else None
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as e:
        raise HeadstoreError(f"{path} is not a Zarr v3 store ({type(e).__name__}): pass the folder made by extract") from e
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


class StoreWriter:
    """Writes whole batches into a preallocated store; marks each done only after all its arrays.

    A batch owns its files: one shard per field in a sharded store (every layer), one chunk per field
    and layer in a chunked one. Before writing a batch the writer deletes what an interrupted writer
    left of it (torn shards, ``*.partial`` temp files), so each file is written whole, once, from memory
    (zarr would otherwise read back and merge an existing shard). In a local store each field's files are made
    durable (fdatasync, folders fsync'ed) and dropped from the page cache before the batch is marked done
    (``durable.py``).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self.root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        self.prov = Provenance.from_dict(self.root.attrs.get(ATTRS_KEY))
        self.partial_pattern = len(self.prov.stored_pattern_layers) < len(self.prov.layers)
        self.local = _is_local(self.path)  # local files are made durable before their batch is marked done
        self.arrays: dict[str, zarr.Array] = {}
        for name in (*self.prov.fields, MANIFEST):
            arr = self.root[name]
            assert isinstance(arr, zarr.Array)
            # dense data: skip zarr's scan for all-fill chunks, except the unstored pattern layers (NaN)
            # of --pattern-layers, which a sharded store then leaves out of the shard
            skip_empty = name == "pattern" and self.partial_pattern and arr.shards is not None
            self.arrays[name] = arr.with_config({"write_empty_chunks": not skip_empty})

    def write_batch(self, start: int, arrays: Mapping[str, np.ndarray]) -> None:
        if start % self.prov.batch_size:
            raise HeadstoreError(f"batch start {start} is not a multiple of batch_size {self.prov.batch_size}")
        manifest = self.arrays[MANIFEST]
        stop = min(start + self.prov.batch_size, manifest.shape[0])
        ib = start // self.prov.batch_size
        self._remove_torn_writes(ib, [*arrays, MANIFEST])
        for name, value in arrays.items():
            arr = self.arrays[name]
            if value.shape[0] != stop - start:
                raise HeadstoreError(f"batch {ib} of {name} has {value.shape[0]} sequences, expected {stop - start}")
            if name == "pattern" and self.partial_pattern:
                # value holds the chosen layers only; the other layers are never written (NaN)
                index = pattern_layer_index(self.prov)
                if arr.shards is not None:  # one shard write: the NaN layers are left out of it
                    full = np.full((value.shape[0], arr.shape[1], *value.shape[2:]), np.nan, dtype=arr.dtype)
                    full[:, index] = value
                    arr[start:stop] = full
                else:
                    for j, i in enumerate(index):
                        arr[start:stop, i] = value[:, j].astype(arr.dtype, copy=False)
            else:
                arr[start:stop] = value.astype(arr.dtype, copy=False)
            field_dir = Path(self.path) / name
            if self.local:
                make_durable(batch_files(field_dir, ib), field_dir)
            _test_kill(f"batch:{ib}:after_field:{name}", (field_dir, ib))
        manifest[start:stop] = 1  # also for a tokens-only store (no arrays per batch)
        _test_kill(f"batch:{ib}:after_field:{MANIFEST}", (Path(self.path) / MANIFEST, ib))

    def _remove_torn_writes(self, ib: int, names: list[str]) -> None:
        """Delete what a writer killed in batch ``ib`` left behind: ``*.partial`` temp files (local
        stores) and the batch's shards, which zarr would otherwise read back, and fail on if torn. This
        writer owns batch ``ib`` (not done), so none of it is a live write or finished data."""
        for name in names:
            arr = self.arrays[name]
            if arr.shards is not None:
                grid = (ib,) + (0,) * (arr.ndim - 1)
                sync(arr.store.delete(f"{arr.path}/{arr.metadata.encode_chunk_key(grid)}"))
        if not _is_local(self.path):
            return
        for name in names:
            c = Path(self.path) / name / "c"
            for p in [*c.glob(f"{ib}.*.partial"), *(c / str(ib)).rglob("*.partial")]:
                p.unlink(missing_ok=True)


def open_store(
    path: str | os.PathLike[str],
    *,
    partial: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Open a store lazily (dask-backed), read-only.

    Checks the schema; adds the ``layer`` coordinate, the derived ``result = z @ W_O`` when
    ``result`` was not materialised, and the derived ``pattern = softmax(q . k / sqrt(d_head))``
    (causal) when ``pattern`` was not stored but ``q`` and ``k`` were (``--fields compact``). With
    ``--pattern-layers``, the layers whose pattern was not stored read as NaN, or are derived the same
    way when ``q`` and ``k`` were stored (the whole ``pattern`` is then float32). An incomplete store
    is refused unless ``partial=True``, which keeps only the completed sequences.
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
    ds = ds.assign_coords(layer=("layer", np.asarray(prov.layers, dtype=np.int64)))
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


@dataclass(frozen=True)
class ValidationReport:
    path: str
    n_sequences: int
    n_complete: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems and self.n_complete == self.n_sequences


def validate(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> ValidationReport:
    """Check schema, shapes, dtypes, completeness, and read every chunk (crc32c) of completed batches."""
    prov = read_provenance(path, storage_options)
    root = _open_group(path, storage_options)
    problems: list[str] = []
    done = done_mask(path, storage_options)
    n = int(done.size)
    cfg = prov.config
    sizes = store_sizes(cfg, prov, n)
    for name in prov.fields:
        f = FIELDS[name]
        if name not in root:
            problems.append(f"{name}: missing array")
            continue
        arr = root[name]
        assert isinstance(arr, zarr.Array)
        want_shape = tuple(sizes[d] for d in f.dims)
        want_dtype = np.dtype(field_dtype(name, prov.storage_dtype))
        if tuple(arr.shape) != want_shape:
            problems.append(f"{name}: shape {tuple(arr.shape)}, expected {want_shape}")
            continue
        if arr.dtype != want_dtype:
            problems.append(f"{name}: dtype {arr.dtype}, expected {want_dtype}")
            continue
        # --pattern-layers: chunks of the other layers are never written, so not "missing"
        layer_ok = pattern_layer_index(prov) if name == "pattern" else None
        # tokens are written at creation: checked whatever the manifest says
        problems.extend(_check_chunks(arr, name, None if name == "tokens" else done, layer_ok))
    for wname in WEIGHTS:
        if wname in root:
            arr = root[wname]
            assert isinstance(arr, zarr.Array)
            problems.extend(_check_chunks(arr, wname, None))
    if prov.weights_store is not None:  # every array of it read back (crc32c) and hashed
        from headstore.store_schema.weights_store import verify

        try:
            verify(str(path), prov.weights_store, storage_options, fresh=True)
        except HeadstoreError as e:
            problems.append(f"weights store: {e}")
    return ValidationReport(str(path), n, int(done.sum()), tuple(problems))


def _check_chunks(arr: zarr.Array, name: str, done: np.ndarray | None, layers: list[int] | None = None) -> list[str]:
    """Read every chunk of completed batches; ``layers``: only these chunk indices along dim 1 (layer)."""
    if arr.shards is not None:
        return _check_shards(arr, name, done, layers)
    problems = []
    grid = arr.cdata_shape
    for idx in np.ndindex(*grid):
        if layers is not None and idx[1] not in layers:
            continue
        if done is not None:
            b0 = idx[0] * arr.chunks[0]
            if not done[b0 : b0 + arr.chunks[0]].all():
                continue
        key = f"{arr.path}/{arr.metadata.encode_chunk_key(idx)}"
        if not sync(arr.store.exists(key)):
            problems.append(f"{name}: chunk {'.'.join(map(str, idx))} is missing")
            continue
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))
        try:
            arr[sel]
        except Exception as e:
            problems.append(f"{name}: chunk {'.'.join(map(str, idx))} is damaged ({type(e).__name__})")
    return problems


_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of an inner chunk that was never written


def _check_shards(arr: zarr.Array, name: str, done: np.ndarray | None, layers: list[int] | None) -> list[str]:
    """Every shard of completed batches: present, its index intact (crc32c), every expected inner chunk
    in it and intact (its own crc32c), then decoded once. Problems name inner chunks by their index in
    the chunk grid (as in a chunked store) and shards by their file key."""
    assert arr.shards is not None
    shards, chunks = arr.shards, arr.chunks
    per = tuple(s // c for s, c in zip(shards, chunks, strict=True))
    n_inner = int(np.prod(per))
    index_bytes = 16 * n_inner + 4  # (offset, nbytes) uint64 pairs + crc32c: zarr's default index codecs
    problems = []
    inner: tuple[Any, ...] = tuple(getattr(getattr(arr.metadata, "codecs", [None])[0], "codecs", ()))
    inner_crc = bool(inner) and isinstance(inner[-1], Crc32cCodec)
    for sidx in np.ndindex(*(-(-n // s) for n, s in zip(arr.shape, shards, strict=True))):
        label = ".".join(map(str, sidx))
        if done is not None:
            b0 = sidx[0] * shards[0]
            if not done[b0 : b0 + shards[0]].all():
                continue
        buf = sync(arr.store.get(f"{arr.path}/{arr.metadata.encode_chunk_key(sidx)}", default_buffer_prototype()))
        if buf is None:
            problems.append(f"{name}: shard {label} is missing")
            continue
        data = buf.to_bytes()
        head, crc = data[-index_bytes:-4], data[-4:]
        if len(data) < index_bytes or np.uint32(crc32c.crc32c(head)).tobytes() != crc:
            problems.append(f"{name}: shard {label} is damaged (torn or corrupt index, {len(data)} bytes)")
            continue
        index = np.frombuffer(head, dtype="<u8").reshape(*per, 2)
        bad = False
        for inner in np.ndindex(*per):
            cidx = tuple(s * p + i for s, p, i in zip(sidx, per, inner, strict=True))
            if any(c * k >= n for c, k, n in zip(cidx, chunks, arr.shape, strict=True)):
                continue  # past the array's edge
            if layers is not None and cidx[1] not in layers:
                continue
            offset, nbytes = (int(x) for x in index[inner])
            where = f"{name}: chunk {'.'.join(map(str, cidx))}"
            if offset == int(_EMPTY):
                problems.append(f"{where} is missing")
                bad = True
            elif offset + nbytes > len(data) - index_bytes or nbytes < 4:
                problems.append(f"{where} is damaged (outside its shard)")
                bad = True
            elif inner_crc:
                body = data[offset : offset + nbytes]
                if np.uint32(crc32c.crc32c(body[:-4])).tobytes() != body[-4:]:
                    problems.append(f"{where} is damaged (ValueError)")
                    bad = True
        if bad:
            continue
        sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(sidx, shards, arr.shape, strict=True))
        try:
            arr[sel]
        except Exception as e:
            problems.append(f"{name}: shard {label} is damaged ({type(e).__name__})")
    return problems


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


def count_files(path: str | os.PathLike[str]) -> int:
    """Files in a local store (metadata included): what a Hub repository or an object store counts."""
    return sum(len(files) for _, _, files in os.walk(path))


def array_nbytes_on_disk(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes on disk per top-level array of a local store."""
    out: dict[str, int] = {}
    root = Path(path)
    for child in sorted(root.iterdir()):
        if child.is_dir():
            out[child.name] = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
    return out
