"""A local zarr store that writes large files past the page cache (``O_DIRECT``), for the extraction's writer.

An extraction streams gigabytes that nobody reads back soon. Through the page cache, each batch's files take
cache pages that ``durable.py`` then drops; on a VM that hands free memory back to its host (free page
reporting) the next batch takes them back from the host, which costs the kernel more than the copy itself,
and more the slower each batch (docs/benchmarks.md, (b3)). Here the bytes go from a small page-aligned
staging buffer, kept by each writing thread and reused for every file, straight to the disk: no cache pages
and no fresh memory per batch. The file is written under a ``*.partial`` name and renamed into place, as
zarr's ``LocalStore`` does, so a killed writer leaves only what the writer's torn-write cleanup removes.

Files under ``DIRECT_MIN_BYTES``, file systems that refuse ``O_DIRECT`` (``EINVAL``: tmpfs, some network
file systems) and systems without it (macOS, Windows) take zarr's own path.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import uuid
from pathlib import Path

import numpy as np
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

DIRECT_MIN_BYTES = 1 << 20
STAGE_BYTES = 8 << 20  # each writing thread's staging buffer: one O_DIRECT write per 8 MiB
_ALIGN = 4096  # O_DIRECT needs offsets, lengths and memory aligned to the device's block size: 4 KiB covers all
_stages = threading.local()


class DirectLocalStore(LocalStore):
    """``LocalStore`` whose ``set`` writes values of ``DIRECT_MIN_BYTES`` or more with ``O_DIRECT``."""

    async def set(self, key: str, value: Buffer) -> None:
        data = memoryview(value.as_buffer_like()).cast("B")
        if len(data) < DIRECT_MIN_BYTES or not hasattr(os, "O_DIRECT"):
            return await super().set(key, value)
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(put_direct, self.root / key, data)


def put_direct(path: Path, data: memoryview) -> None:
    """Write ``data`` to ``path``: its whole 4 KiB blocks with ``O_DIRECT``, the tail through a normal write,
    both into a temporary file then renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        head = _write_direct(tmp, data)
        with open(tmp, "r+b" if head else "wb") as f:
            f.seek(head)
            f.write(data[head:])
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stage() -> memoryview:
    """This thread's page-aligned staging buffer (anonymous maps are page-aligned), made once and reused, so
    its pages stay the process's own."""
    buf = getattr(_stages, "buf", None)
    if buf is None or len(buf) != STAGE_BYTES:
        buf = _stages.buf = mmap.mmap(-1, STAGE_BYTES)
    return memoryview(buf)


def _address(data: memoryview) -> int:
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data) if len(data) else 0


def _write_direct(tmp: Path, data: memoryview) -> int:
    """Write the whole 4 KiB blocks of ``data`` to a new ``tmp`` with ``O_DIRECT``, ``STAGE_BYTES`` at a time
    through the staging buffer; how many bytes that was (0 where the file system refuses ``O_DIRECT`` with
    ``EINVAL``, at open or at the first write)."""
    head = len(data) - len(data) % _ALIGN
    if head == 0:
        return 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 0
        raise
    aligned = _address(data) % _ALIGN == 0  # a page-aligned source (shard_encode.py's buffer) is written as it is
    stage = None if aligned else _stage()
    try:
        for off in range(0, head, STAGE_BYTES):
            n = min(STAGE_BYTES, head - off)
            piece = data[off : off + n]
            if stage is not None:
                stage[:n] = piece
                piece = stage[:n]
            try:
                written = os.write(fd, piece)
            except OSError as e:
                if e.errno == errno.EINVAL and off == 0:
                    return 0
                raise
            if written != n:  # a regular file writes short only when it is out of space
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    finally:
        os.close(fd)
    return head
