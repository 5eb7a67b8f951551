"""Pinned host buffers reused across batches (CUDA): allocating page-locked memory is slow (a ``cudaHostAlloc``
per tensor, pages locked one by one), and a fill would otherwise take a fresh one for every array of every batch.

A batch takes its buffers from the pool as its device-to-host copies are issued (``HostBatch``) and gives them
back once the writer has written it (``release``, called by ``run._write_batch`` after ``StoreWriter.write_batch``
returns: the writer reads the arrays synchronously, so nothing reads a buffer after that). A buffer is never
handed out twice before it comes back; the fill keeps at most two batches alive (the one being written, the one
being copied), so the pool holds about two batches' worth per shape.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

Key = tuple[tuple[int, ...], torch.dtype]


class PinnedPool:
    """Free host tensors keyed by (shape, dtype). ``pin_memory=False`` (tests, CPU machines) pools plain tensors:
    the same bookkeeping, without CUDA. Thread-safe: the writer thread gives back while the loop takes."""

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory
        self._free: dict[Key, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # tensors made (not reused): what the pool saves is takes - allocated
        self.takes = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A free buffer of this shape and dtype (contents undefined), a new one when none is free."""
        key = (tuple(int(n) for n in shape), dtype)
        with self._lock:
            self.takes += 1
            free = self._free.get(key)
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(key[0], dtype=dtype, pin_memory=self.pin_memory)

    def give_back(self, tensors: Iterable[torch.Tensor]) -> None:
        """Return buffers taken from this pool; nothing may read or write them afterwards."""
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def n_free(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._free.values())
