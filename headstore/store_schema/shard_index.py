"""The sharding index format, written down once (zarr's sharding codec with its default index codecs).

A shard ends with its index: for each inner chunk, in C order of the chunk grid inside the shard, a
little-endian uint64 pair (offset, nbytes) into the shard, ``EMPTY`` for both when the chunk is not stored;
then the crc32c of those bytes (4 bytes, little-endian). ``write.shard_encode`` writes it, ``read.integrity``
checks it, ``extract.plan`` counts its bytes.
"""

from __future__ import annotations

import crc32c
import numpy as np

EMPTY = np.uint64(2**64 - 1)  # offset and nbytes of an inner chunk that is not stored
ENTRY_NBYTES = 16  # (offset, nbytes) as two little-endian uint64
CRC_NBYTES = 4


def index_nbytes(n_inner: int) -> int:
    """Bytes of a shard's index with ``n_inner`` inner chunks, its crc32c included."""
    return ENTRY_NBYTES * n_inner + CRC_NBYTES


def crc(data: np.ndarray | bytes) -> np.ndarray:
    """The crc32c codec's 4 bytes: crc32c of ``data``, little-endian (uint8)."""
    view = data.data if isinstance(data, np.ndarray) else data
    return np.array([crc32c.crc32c(view)], dtype="<u4").view(np.uint8)


def empty_index(chunks_per_shard: tuple[int, ...]) -> np.ndarray:
    """An index with no chunk stored: shape ``(*chunks_per_shard, 2)``, uint64 little-endian."""
    return np.full((*chunks_per_shard, 2), EMPTY, dtype="<u8")


def encode_index(index: np.ndarray, out: np.ndarray) -> int:
    """Write ``index`` and its crc32c into the uint8 buffer ``out``; the bytes written."""
    raw = np.ascontiguousarray(index, dtype="<u8").view(np.uint8).reshape(-1)
    out[: raw.size] = raw
    out[raw.size : raw.size + CRC_NBYTES] = crc(raw)
    return raw.size + CRC_NBYTES


def decode_index(shard: bytes, chunks_per_shard: tuple[int, ...]) -> np.ndarray | None:
    """The index at the end of ``shard`` (shape ``(*chunks_per_shard, 2)``), or None when the shard is too
    short to hold it or its crc32c does not match (torn or corrupt)."""
    n = index_nbytes(int(np.prod(chunks_per_shard)))
    if len(shard) < n:
        return None
    head, check = shard[-n:-CRC_NBYTES], shard[-CRC_NBYTES:]
    if crc(head).tobytes() != check:
        return None
    return np.frombuffer(head, dtype="<u8").reshape(*chunks_per_shard, 2)
