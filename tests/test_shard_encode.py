"""Whole shards encoded in one pass (store_schema/write/shard_encode.py) are the bytes zarr's own sharding codec writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

import headstore.store_schema.write.direct as direct
from headstore.extract import ExtractRequest, extract
from headstore.store_schema import validate
from headstore.store_schema.write.shard_encode import ShardBuffer, ShardEncoder

CRC = Crc32cCodec()
LZ4 = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")


def _zarr_shard(arr: zarr.Array, value: np.ndarray) -> bytes:
    """Shard 0 of ``arr`` as zarr writes it: ``value`` set through zarr's codec pipeline, its file read back."""
    arr[tuple(slice(0, s) for s in value.shape)] = value
    key = arr.metadata.encode_chunk_key((0,) * arr.ndim)
    got = sync(arr.store.get(key, prototype=default_buffer_prototype()))
    assert got is not None
    return got.to_bytes()


def _array(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, compressors: Any, fill: Any = 0) -> zarr.Array:
    return zarr.create_array(
        store=MemoryStore(), shape=shape, chunks=chunks, shards=shape, dtype=dtype, compressors=compressors,
        fill_value=fill, config={"write_empty_chunks": True},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [
        ((4, 3, 16, 8), (4, 1, 16, 8)),  # one inner chunk per layer, as headstore's fields
        ((6, 4, 10), (3, 2, 5)),  # a 2 x 2 x 2 grid: Morton order interleaves the dims
        ((5, 12), (1, 4)),  # a 5 x 3 grid, not a power of two
        ((7,), (7,)),  # one inner chunk
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8"])
@pytest.mark.parametrize("compressors", [[CRC], [LZ4, CRC], [ZstdCodec(level=1), CRC]], ids=["raw", "lz4", "zstd"])
def test_encoded_shard_is_zarrs(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, compressors: Any) -> None:
    rng = np.random.default_rng(len(shape) * 100 + sum(chunks))
    value = (rng.standard_normal(shape) * 50).astype(dtype)
    value.reshape(-1)[: value.size // 3] = 0  # compressible runs, and an all-fill inner chunk in some grids
    arr = _array(shape, chunks, dtype, compressors)
    enc = ShardEncoder.for_array(arr)
    assert enc is not None
    assert bytes(enc.encode(value, ShardBuffer())) == _zarr_shard(arr, value)
    np.testing.assert_array_equal(arr[:], value)


def test_buffer_is_page_aligned_and_reused() -> None:
    """Each encode goes into the same page-aligned memory (``O_DIRECT`` writes it as it is); a bigger shard grows it."""
    buf = ShardBuffer()
    small, big = _array((4, 64), (4, 8), "float32", [CRC]), _array((4, 4096), (4, 512), "float32", [CRC])
    es, eb = ShardEncoder.for_array(small), ShardEncoder.for_array(big)
    assert es is not None and eb is not None
    addresses = []
    for enc, shape in [(es, (4, 64)), (es, (4, 64)), (eb, (4, 4096)), (eb, (4, 4096))]:
        out = enc.encode(np.ones(shape, np.float32), buf)
        assert out.dtype == np.uint8
        addresses.append(out.ctypes.data)
    assert all(a % 4096 == 0 for a in addresses)
    assert addresses[0] == addresses[1] and addresses[2] == addresses[3]


def _chunked() -> zarr.Array:
    return zarr.create_array(store=MemoryStore(), shape=(8, 8), chunks=(4, 4), dtype="f4")


def _skips_empty_chunks() -> zarr.Array:  # zarr's default: all-fill inner chunks are left out of the shard
    return zarr.create_array(store=MemoryStore(), shape=(8, 8), chunks=(4, 4), shards=(8, 8), dtype="f4",
                             compressors=[CRC])  # fmt: skip


def _index_at_start() -> zarr.Array:
    codec = ShardingCodec(chunk_shape=(4, 4), codecs=[BytesCodec(), CRC], index_location="start")
    return zarr.create_array(store=MemoryStore(), shape=(8, 8), dtype="f4", serializer=codec, compressors=None,
                             config={"write_empty_chunks": True})  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        _chunked,
        lambda: _array((8, 8), (4, 4), ">f4", [CRC]),  # big-endian values
        lambda: _array((8, 8), (4, 4), "f4", [LZ4]),  # no checksum
        _skips_empty_chunks,
        _index_at_start,
    ],
    ids=["chunked", "big_endian", "no_crc", "skips_empty_chunks", "index_at_start"],
)
def test_other_chains_take_zarrs_path(make: Any) -> None:
    assert ShardEncoder.for_array(make()) is None


def test_refuses_a_value_of_another_shape() -> None:
    enc = ShardEncoder.for_array(_array((4, 8), (2, 8), "float32", [CRC]))
    assert enc is not None
    with pytest.raises(ValueError, match="expected"):
        enc.encode(np.zeros((2, 8), np.float32), ShardBuffer())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extraction_writes_zarrs_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """An extraction whose full batches go through the encoder (the last, short one through zarr): every shard file
    is the one zarr writes for the same values, and the store validates."""
    calls: list[tuple[int, ...]] = []
    real = ShardEncoder.encode
    monkeypatch.setattr(ShardEncoder, "encode", lambda self, v, b: calls.append(v.shape) or real(self, v, b))
    out = tmp_path / "s.zarr"
    extract(ExtractRequest(model="tiny-llama", data="text", out=str(out), n_seq=10, seq_len=24, batch_size=4,
                           dtype=dtype, progress=False, fields=("default",)))  # fmt: skip
    g = zarr.open_group(out, mode="r")
    sharded = [n for n in g.array_keys() if n != "tokens" and g[n].shards is not None and g[n].shape[0] == 10]
    assert {"pattern", "v", "z"} <= set(sharded)
    assert len(calls) == 2 * len(sharded)  # batches 0 and 1 of each sharded field; batch 2 (2 sequences) is zarr's
    for name in sharded:
        src = g[name]
        twin = zarr.create_array(
            store=MemoryStore(), shape=src.shape, chunks=src.chunks, shards=src.shards, dtype=src.dtype,
            compressors=src.compressors, fill_value=src.fill_value, config={"write_empty_chunks": True},
        )  # fmt: skip
        for b in range(3):
            twin[4 * b : 4 * b + 4] = src[4 * b : 4 * b + 4]
            key = src.metadata.encode_chunk_key((b,) + (0,) * (src.ndim - 1))
            mine = (out / name / key).read_bytes()
            zarrs = sync(twin.store.get(key, prototype=default_buffer_prototype()))
            assert zarrs is not None and mine == zarrs.to_bytes(), (name, b)
    assert validate(out).ok


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")
def test_aligned_source_is_written_without_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder's page-aligned shard goes to disk with O_DIRECT straight from its memory; an unaligned one is
    staged. Both write every byte."""
    monkeypatch.setattr(direct, "STAGE_BYTES", 65536)
    staged: list[int] = []
    real = direct._stage
    monkeypatch.setattr(direct, "_stage", lambda: staged.append(1) or real())
    data = ShardBuffer().take(3 * 65536 + 777)
    data[:] = np.random.default_rng(0).integers(0, 256, data.size, dtype=np.uint8)
    direct.put_direct(tmp_path / "aligned", memoryview(data))
    assert (tmp_path / "aligned").read_bytes() == data.tobytes()
    if direct._write_direct(tmp_path / "probe", memoryview(data)) == 0:
        pytest.skip("this folder refuses O_DIRECT")
    assert staged == []
    direct.put_direct(tmp_path / "unaligned", memoryview(data[1:]))
    assert (tmp_path / "unaligned").read_bytes() == data[1:].tobytes()
    assert staged


def test_pattern_of_chosen_layers_is_zarrs(tmp_path: Path) -> None:
    """--pattern-layers: zarr leaves the unstored (NaN) layers out of the shard, so that pattern is not encoded
    here; the other fields are."""
    from headstore.store_schema import StoreWriter

    out = tmp_path / "p.zarr"
    extract(ExtractRequest(model="tiny-gpt2", data="text", out=str(out), n_seq=4, seq_len=16, batch_size=4,
                           pattern_layers=(1,), progress=False))  # fmt: skip
    encoders = StoreWriter(out).encoders
    assert "pattern" not in encoders and {"v", "z"} <= set(encoders)
    assert validate(out).ok
