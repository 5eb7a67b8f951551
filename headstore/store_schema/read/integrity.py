"""Validate a store: schema, shapes, dtypes, completeness, and every chunk and shard of completed batches read back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from headstore.store_schema.arrays import store_layout, store_sizes
from headstore.store_schema.attention import pattern_layer_index
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.hashing import content_sha256
from headstore.store_schema.layout import ATTRS_KEY, WEIGHTS, WEIGHTS_ATTRS
from headstore.store_schema.paths import StorePath
from headstore.store_schema.provenance import Provenance
from headstore.store_schema.read.guard import guarded_arrays, stored_strings
from headstore.store_schema.read.reader import done_mask, open_group
from headstore.store_schema.read.weights import verify
from headstore.store_schema.shard_index import EMPTY, crc, decode_index, index_nbytes


@dataclass(frozen=True)
class ValidationReport:
    """``weights_sha256``: set when ``path`` is a weights store (``extract --weights``; no sequences), the hash
    recorded at its creation."""

    path: str
    n_sequences: int
    n_complete: int
    problems: tuple[str, ...]
    weights_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.n_complete == self.n_sequences


def validate(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> ValidationReport:
    """Check schema, shapes, dtypes, completeness, and read every chunk (crc32c) of completed batches; of a
    weights store, every chunk and the hash recorded at its creation."""
    where = StorePath.of(path, storage_options)
    weights = _weights_group(where)
    if weights is not None:
        return _validate_weights(path, *weights)
    root = open_group(where)
    prov = Provenance.from_dict(root.attrs.get(ATTRS_KEY))
    problems: list[str] = []
    done = done_mask(root)
    n = int(done.size)
    layout = store_layout(prov, store_sizes(prov.config, prov, n))
    for name in prov.fields:
        if name not in root:
            problems.append(f"{name}: missing array")
            continue
        arr = root[name]
        assert isinstance(arr, zarr.Array)
        want_shape, want_dtype = layout[name].shape, np.dtype(layout[name].dtype)
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
    for strings in stored_strings(root, str(path)).values():  # vocab, string columns: bytes and offsets
        for sname in strings.stored:
            arr = root[sname]
            assert isinstance(arr, zarr.Array)
            problems.extend(_check_chunks(arr, sname, None))
    if prov.weights_store is not None:  # every array of it read back (crc32c) and hashed
        try:
            verify(str(path), prov.weights_store, storage_options, content=True)
        except HeadstoreError as e:
            problems.append(f"weights store: {e}")
    return ValidationReport(str(path), n, int(done.sum()), tuple(problems))


def _weights_group(where: StorePath) -> tuple[zarr.Group, dict[str, Any]] | None:
    """The group of a weights store at ``where`` and its weights attrs; None for anything else (open_group
    then says what it is)."""
    try:
        root = where.open_group()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError):
        return None
    got = root.attrs.get(WEIGHTS_ATTRS)
    return (root, got) if isinstance(got, dict) and ATTRS_KEY not in root.attrs else None


def _validate_weights(path: str | os.PathLike[str], root: zarr.Group, attrs: dict[str, Any]) -> ValidationReport:
    """Every chunk of a weights store read back (crc32c), then its arrays hashed as the stores that use it hash
    them on open (``hashing.content_sha256``) against the sha256 recorded at its creation."""
    arrays = guarded_arrays(root, str(path))  # vocab as strings, however it is stored
    recorded = str(attrs.get("sha256"))
    problems = [f"{n}: missing array" for n in attrs.get("arrays", []) if n not in arrays]
    for name, arr in sorted(root.arrays()):
        problems.extend(_check_chunks(arr, name, None))
    if not problems and (got := content_sha256(arrays)) != recorded:
        problems.append(
            f"its arrays hash to sha256 {got[:12]}..., not the {recorded[:12]}... recorded at its creation: it was "
            "changed, and the stores made with it will refuse it; restore it or re-extract"
        )
    return ValidationReport(str(path), 0, 0, tuple(problems), weights_sha256=recorded)


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


def _check_shards(arr: zarr.Array, name: str, done: np.ndarray | None, layers: list[int] | None) -> list[str]:
    """Every shard of completed batches: present, its index intact (crc32c), every expected inner chunk
    in it and intact (its own crc32c), then decoded once. Problems name inner chunks by their index in
    the chunk grid (as in a chunked store) and shards by their file key."""
    assert arr.shards is not None
    shards, chunks = arr.shards, arr.chunks
    per = tuple(s // c for s, c in zip(shards, chunks, strict=True))
    n_inner = int(np.prod(per))
    index_bytes = index_nbytes(n_inner)
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
        index = decode_index(data, per)
        if index is None:
            problems.append(f"{name}: shard {label} is damaged (torn or corrupt index, {len(data)} bytes)")
            continue
        bad = False
        for inner in np.ndindex(*per):
            cidx = tuple(s * p + i for s, p, i in zip(sidx, per, inner, strict=True))
            if any(c * k >= n for c, k, n in zip(cidx, chunks, arr.shape, strict=True)):
                continue  # past the array's edge
            if layers is not None and cidx[1] not in layers:
                continue
            offset, nbytes = (int(x) for x in index[inner])
            where = f"{name}: chunk {'.'.join(map(str, cidx))}"
            if offset == int(EMPTY):
                problems.append(f"{where} is missing")
                bad = True
            elif offset + nbytes > len(data) - index_bytes or nbytes < 4:
                problems.append(f"{where} is damaged (outside its shard)")
                bad = True
            elif inner_crc:
                body = data[offset : offset + nbytes]
                if crc(body[:-4]).tobytes() != body[-4:]:
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
