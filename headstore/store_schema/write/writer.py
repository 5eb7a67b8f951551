"""Write whole batches into a created store, each marked done only once its files are durable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync

from headstore.store_schema.attention import pattern_layer_index
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import ATTRS_KEY, MANIFEST
from headstore.store_schema.paths import StorePath
from headstore.store_schema.provenance import Provenance
from headstore.store_schema.write import checkpoint
from headstore.store_schema.write.direct import DirectLocalStore
from headstore.store_schema.write.durable import batch_files, make_durable
from headstore.store_schema.write.shard_encode import ShardBuffer, ShardEncoder


class StoreWriter:
    """Writes whole batches into a preallocated store; marks each done only after all its arrays.

    A batch owns its files: one shard per field in a sharded store (every layer), one chunk per field
    and layer in a chunked one. Before writing a batch the writer deletes what an interrupted writer
    left of it (torn shards, ``*.partial`` temp files), so each file is written whole, once, from memory
    (zarr would otherwise read back and merge an existing shard). In a local store each field's files are made
    durable (fdatasync, folders fsync'ed) and dropped from the page cache before the batch is marked done
    (``durable.py``); files of 1 MiB or more are written past the page cache (``direct.py``). A full batch's
    shards are encoded in one pass over the data (``shard_encode.py``), the rest by zarr.
    """

    def __init__(self, path: str | os.PathLike[str], prov: Provenance | None = None):
        """``prov``: the store's provenance, which the caller that created the store holds (None: read from it)."""
        self.path = str(path)
        where = StorePath.of(self.path)
        self.local = where.local  # local files are made durable before their batch is marked done
        store = DirectLocalStore(str(where.folder)) if self.local else self.path
        self.root = zarr.open_group(store, mode="r+", zarr_format=3)
        self.prov = prov if prov is not None else Provenance.from_dict(self.root.attrs.get(ATTRS_KEY))
        self.partial_pattern = len(self.prov.stored_pattern_layers) < len(self.prov.layers)
        self.arrays: dict[str, zarr.Array] = {}
        for name in (*self.prov.fields, MANIFEST):
            arr = self.root[name]
            assert isinstance(arr, zarr.Array)
            # dense data: skip zarr's scan for all-fill chunks, except the unstored pattern layers (NaN)
            # of --pattern-layers, which a sharded store then leaves out of the shard
            skip_empty = name == "pattern" and self.partial_pattern and arr.shards is not None
            self.arrays[name] = arr.with_config({"write_empty_chunks": not skip_empty})
        # whole shards in one pass (shard_encode.py); not --pattern-layers' pattern (zarr leaves its NaN layers out)
        self.encoders = {
            name: enc
            for name, arr in self.arrays.items()
            if name != MANIFEST and (enc := ShardEncoder.for_array(arr)) is not None
        }
        self.shard_buffer = ShardBuffer()

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
            elif name in self.encoders and value.shape == self.encoders[name].shard_shape:
                shard = self.encoders[name].encode(value.astype(arr.dtype, copy=False), self.shard_buffer)
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((ib,) + (0,) * (arr.ndim - 1))}"
                sync(arr.store.set(key, Buffer.from_array_like(shard)))
            else:
                arr[start:stop] = value.astype(arr.dtype, copy=False)
            field_dir = Path(self.path) / name
            if self.local:
                make_durable(batch_files(field_dir, ib), field_dir)
            checkpoint.reached(f"batch:{ib}:after_field:{name}", (field_dir, ib))
        manifest[start:stop] = 1  # also for a tokens-only store (no arrays per batch)
        checkpoint.reached(f"batch:{ib}:after_field:{MANIFEST}", (Path(self.path) / MANIFEST, ib))

    def _remove_torn_writes(self, ib: int, names: list[str]) -> None:
        """Delete what a writer killed in batch ``ib`` left behind: ``*.partial`` temp files (local
        stores) and the batch's shards, which zarr would otherwise read back, and fail on if torn. This
        writer owns batch ``ib`` (not done), so none of it is a live write or finished data."""
        for name in names:
            arr = self.arrays[name]
            if arr.shards is not None:
                grid = (ib,) + (0,) * (arr.ndim - 1)
                sync(arr.store.delete(f"{arr.path}/{arr.metadata.encode_chunk_key(grid)}"))
        if not self.local:
            return
        for name in names:
            c = Path(self.path) / name / "c"
            for p in [*c.glob(f"{ib}.*.partial"), *(c / str(ib)).rglob("*.partial")]:
                p.unlink(missing_ok=True)
