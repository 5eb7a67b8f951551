"""Whole shards encoded in one pass over their data, for the extraction's writer.

zarr (3.1) writes a whole shard of an uncompressed array in about six passes over its bytes: each inner chunk
is allocated filled with the fill value and the data copied in (zarr-python#2038), the checksum is appended
by copying the chunk, the shard is concatenated, and the store copies it once more; its checksum
(google-crc32c) runs at a third of ``crc32c``'s speed here. On a 2-core box every pass is taken from the next
batch's forward pass (docs/benchmarks.md, (b)). Here, for the codec chains headstore creates, each inner chunk
is copied once into a reused page-aligned shard buffer (through zarr's own compressor where the chain
compresses), checksummed in place, and followed by the shard index as the sharding spec lays it out
(``offset, length`` uint64 pairs in C order, little-endian, then their crc32c, at the end); the buffer goes to
the store whole (``O_DIRECT`` straight from it on local disks: ``direct.py``).

The bytes are zarr's own: tests/test_shard_encode.py compares every field's shard files with zarr's. Anything else
takes zarr's path: another codec chain, an array that leaves all-fill inner chunks out (``write_empty_chunks``
off), a shard the batch does not fill (the last, short batch), a big-endian host. Reading is always zarr's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.indexing import morton_order_iter
from zarr.core.sync import sync

from headstore.store_schema.shard_index import crc, empty_index, encode_index, index_nbytes

_PAGE = 4096


@dataclass(frozen=True)
class ShardEncoder:
    """How one sharded array's whole shards are encoded: the inner chunk grid, in the spec's Morton order, and
    the bytes-to-bytes codecs between the raw chunk and its crc32c (a compressor, or none)."""

    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    chunks_per_shard: tuple[int, ...]
    dtype: np.dtype
    order: tuple[tuple[int, ...], ...]
    middle: tuple[BytesBytesCodec, ...]
    spec: ArraySpec

    @classmethod
    def for_array(cls, arr: zarr.Array) -> ShardEncoder | None:
        """The encoder of ``arr``'s shards, or None where its codecs are not a chain this encodes (zarr's path)."""
        codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little":
            return None
        if not arr.async_array.config.write_empty_chunks:  # zarr would leave all-fill inner chunks out
            return None
        sc = codecs[0]
        inner = tuple(sc.codecs)
        dtype = np.dtype(arr.dtype)
        index_ok = [type(c) for c in sc.index_codecs] == [BytesCodec, Crc32cCodec] and sc.index_location == (
            ShardingCodecIndexLocation.end
        )
        little = dtype.itemsize == 1 or (isinstance(inner[0], BytesCodec) and inner[0].endian is not None
                                         and inner[0].endian.value == "little")  # fmt: skip
        if not (index_ok and len(inner) >= 2 and type(inner[0]) is BytesCodec and little and dtype.isnative):
            return None
        if type(inner[-1]) is not Crc32cCodec or not all(isinstance(c, BytesBytesCodec) for c in inner[1:-1]):
            return None
        assert arr.shards is not None
        per = tuple(s // c for s, c in zip(arr.shards, sc.chunk_shape, strict=True))
        spec = ArraySpec(
            shape=sc.chunk_shape,
            dtype=arr.metadata.data_type,  # type: ignore[union-attr]  # a v3 array (checked above)
            fill_value=arr.metadata.fill_value,
            config=ArrayConfig.from_dict({}),
            prototype=default_buffer_prototype(),
        )
        middle = tuple(c for c in inner[1:-1] if isinstance(c, BytesBytesCodec))  # all of them (checked above)
        return cls(tuple(arr.shards), tuple(sc.chunk_shape), per, dtype, tuple(morton_order_iter(per)), middle, spec)

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one raw inner chunk."""
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def max_bytes(self) -> int:
        """An upper bound of an encoded shard's size (compressors may grow incompressible data a little)."""
        chunk = self.chunk_nbytes
        return len(self.order) * (chunk + chunk // 8 + 1024) + index_nbytes(len(self.order))

    def encode(self, value: np.ndarray, buf: ShardBuffer) -> np.ndarray:
        """The encoded shard of ``value`` (exactly the shard's shape and dtype): uint8 bytes in ``buf``, valid until
        ``buf``'s next use."""
        if value.shape != self.shard_shape or value.dtype != self.dtype:
            raise ValueError(f"shard {value.shape} {value.dtype}, expected {self.shard_shape} {self.dtype}")
        out = buf.take(self.max_bytes())
        index = empty_index(self.chunks_per_shard)  # every inner chunk is written
        chunk_nbytes = self.chunk_nbytes
        off = 0
        for coords in self.order:
            part = value[tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, self.chunk_shape, strict=True))]
            if self.middle:  # compressed: the raw chunk in scratch, zarr's compressors into the shard
                raw = buf.scratch(chunk_nbytes)
                np.copyto(raw.view(self.dtype).reshape(self.chunk_shape), part)
                enc: Buffer | None = self.spec.prototype.buffer.from_array_like(raw)
                for codec in self.middle:
                    (enc,) = sync(codec.encode([(enc, self.spec)]))
                assert enc is not None
                data = enc.as_numpy_array()
                n = data.size
                out[off : off + n] = data
            else:
                n = chunk_nbytes
                np.copyto(out[off : off + n].view(self.dtype).reshape(self.chunk_shape), part)
            out[off + n : off + n + 4] = crc(out[off : off + n])
            index[coords] = off, n + 4
            off += n + 4
        off += encode_index(index, out[off:])
        return out[:off]


class ShardBuffer:
    """A writer's reused shard buffer, page-aligned for ``O_DIRECT`` and grown as needed, and a scratch buffer for
    one raw inner chunk. Both come from malloc, so under ``headstore extract``'s tuned malloc (``cli/malloc.py``)
    a later writer in the process reuses the same pages instead of faulting in fresh ones."""

    def __init__(self) -> None:
        self._mem = np.empty(0, dtype=np.uint8)
        self._scratch = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self._mem.size < nbytes + _PAGE:
            self._mem = np.empty(nbytes + _PAGE, dtype=np.uint8)
        skip = -self._mem.ctypes.data % _PAGE
        return self._mem[skip : skip + nbytes]

    def scratch(self, nbytes: int) -> np.ndarray:
        if self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]
