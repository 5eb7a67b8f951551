"""The store's arrays as one value: name, dims, shape, dtype, chunks, shards, codecs and fill of each.

``store_layout(prov, sizes)`` is built once from the provenance and the dim sizes; ``write.create`` makes the
arrays from it (on disk, or in memory for ``extract.plan``'s measure), and ``read.integrity`` checks a store's
arrays against it. The rules (``docs/store-spec.md``): ``batch_size`` sequences along batch and one layer along
layer per chunk; with ``layout="sharded"`` one shard per (field, batch) holding every layer; codecs by
measurement (``codecs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from headstore.store_schema.layout import FIELDS, MANIFEST
from headstore.store_schema.provenance import Provenance

ZSTD_LEVEL = 1


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store, as ``zarr.Group.create_array`` takes it."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None

    @property
    def fill_value(self) -> Any:
        return fill_value(self.dtype)

    @property
    def compressors(self) -> list[Any]:
        return codecs(self.name, self.dtype)


def codecs(name: str, dtype: Any) -> list[Any]:
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


def fill_value(dtype: str) -> Any:
    """NaN for floats (a missing chunk reads as NaN, never as data), 0 otherwise."""
    return np.nan if np.dtype(dtype).kind == "f" else 0


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


def whole_shard(shape: tuple[int, ...], chunks: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """Written-once arrays (tokens, per-layer weights) in a sharded store: one shard file for the whole
    array, inner chunks as in a chunked store."""
    shard = tuple(-(-s // c) * c for s, c in zip(shape, chunks, strict=True))
    return shard if layout == "sharded" and shard != tuple(chunks) else None


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
        "ig_step": prov.grad_ig or 1,
    }


def array_spec(name: str, dims: tuple[str, ...], dtype: str, sizes: Mapping[str, int], batch_size: int,
               layout: str) -> ArraySpec:  # fmt: skip
    """One per-sequence array (a field, or the manifest) by the chunk and shard rules."""
    shape = tuple(sizes[d] for d in dims)
    chunks = field_chunks(dims, sizes, batch_size)
    shards = field_shards(dims, sizes, batch_size, layout)
    if name == "tokens":  # written once, at creation
        shards = whole_shard(shape, chunks, layout)
    return ArraySpec(name, dims, shape, dtype, chunks, shards)


def store_layout(prov: Provenance, sizes: Mapping[str, int]) -> dict[str, ArraySpec]:
    """Every field of ``prov`` and the manifest (one file per batch), in creation order."""
    out = {}
    for name in prov.fields:
        dtype = field_dtype(name, prov.storage_dtype)
        out[name] = array_spec(name, FIELDS[name].dims, dtype, sizes, prov.batch_size, prov.layout)
    out[MANIFEST] = array_spec(MANIFEST, ("batch",), "uint8", sizes, prov.batch_size, "chunked")
    return out
