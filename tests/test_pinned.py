"""The pinned host buffers a CUDA fill reuses across batches: the pool's bookkeeping, on CPU tensors (CI has no
GPU), and the fill's order of take, write and give back, run as ``run._fill`` runs it (one writer thread)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from headstore.extract.batch import HostBatch
from headstore.extract.pinned import PinnedPool
from headstore.extract.run import write_batch

SHAPES = {"v": ((4, 2, 16, 2, 8), torch.float16), "ln1_scale": ((4, 2, 16), torch.float32)}


def test_pool_reuses_a_buffer_only_after_it_comes_back() -> None:
    pool = PinnedPool(pin_memory=False)
    a = pool.take((4, 8), torch.float16)
    b = pool.take((4, 8), torch.float16)
    assert a.data_ptr() != b.data_ptr() and pool.allocated == 2  # a is in use: b is another buffer
    pool.give_back([a])
    assert pool.take((4, 8), torch.float16) is a and pool.allocated == 2
    other = [pool.take((4, 8), torch.float32), pool.take((8, 4), torch.float16)]  # another dtype, another shape
    assert all(t.data_ptr() not in (a.data_ptr(), b.data_ptr()) for t in other) and pool.allocated == 4
    assert [tuple(t.shape) for t in other] == [(4, 8), (8, 4)] and other[0].dtype == torch.float32
    pool.give_back([b, *other])
    assert pool.n_free() == 3 and pool.takes == 5


class _Writer:
    """Reads every array slowly, as the store writer does, and checks it still holds its batch's values."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.written: list[int] = []
        self.fail_at = fail_at

    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for _ in range(3):
            time.sleep(0.002)  # the loop fills the next batch meanwhile
            for name, a in arrays.items():
                assert (a == start).all(), f"{name} of batch {start} was overwritten while written"
        if start == self.fail_at:
            raise OSError("disk full")
        self.written.append(start)


def _fill(pool: PinnedPool, writer: _Writer, n_batches: int) -> list[HostBatch]:
    """``run._fill``'s loop with the device copy replaced by a fill: take, fill, wait for the previous write,
    submit this one (``run.write_batch``, which gives the buffers back)."""
    batches, pending = [], None
    with ThreadPoolExecutor(max_workers=1) as ex:
        for start in range(n_batches):
            host = {name: pool.take(shape, dtype).fill_(start) for name, (shape, dtype) in SHAPES.items()}
            batch = HostBatch(host, torch.device("cpu"))
            batch.pool = pool  # as HostBatch sets it on CUDA: the tensors came from the pool
            batches.append(batch)
            if pending is not None:
                pending.result()
            pending = ex.submit(write_batch, writer, start, batch)
        assert isinstance(pending, Future)
        pending.result()
    return batches


def test_fill_reuses_two_batches_of_buffers_and_never_one_being_written() -> None:
    pool = PinnedPool(pin_memory=False)
    writer = _Writer()
    batches = _fill(pool, writer, 12)
    assert writer.written == list(range(12))  # every batch read back its own values (_Writer checks)
    assert pool.allocated == 2 * len(SHAPES) and pool.takes == 12 * len(SHAPES)  # two sets, reused
    assert pool.n_free() == 2 * len(SHAPES) and all(b.pool is None and not b.tensors for b in batches)


def test_a_failed_write_still_gives_its_buffers_back() -> None:
    pool = PinnedPool(pin_memory=False)
    with pytest.raises(OSError, match="disk full"):
        _fill(pool, _Writer(fail_at=3), 6)
    # every buffer came back but the batch taken before the failure surfaced (the run stops: the pool goes with it)
    assert pool.n_free() == pool.allocated - len(SHAPES) and pool.allocated == 2 * len(SHAPES)


def test_cpu_batches_do_not_touch_the_pool() -> None:
    pool = PinnedPool(pin_memory=False)
    t = {"v": torch.ones(2, 3)}
    batch = HostBatch(t, torch.device("cpu"), pool)
    assert batch.tensors["v"] is t["v"] and batch.pool is None  # the CPU path: its own tensors, as before
    batch.release()
    assert batch.tensors["v"] is t["v"] and pool.takes == 0 and pool.n_free() == 0
