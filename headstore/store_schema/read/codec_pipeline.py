"""Read headstore's fields at the codec's pace: zarrs (Rust) where it serves safely, zarr-python's pipeline otherwise.

zarr-python picks an array's codec pipeline once, when the array object is created, from
``zarr.config["codec_pipeline.path"]``; the array keeps it for every later read, including the reads dask makes
long after ``open_store`` returned. :func:`with_fast_reads` therefore opens a second ``zarr.Array`` over the same
store and array inside a brief ``zarr.config.set`` naming zarrs' pipeline, and restores the caller's
configuration on the way out: a researcher's own zarr arrays keep whatever pipeline their configuration names.
(The window is process-wide, as zarr's configuration is: an array another thread opens during it gets zarrs'
pipeline too.)

:class:`FastReads` sends a read to the zarrs array only when it covers whole codec chunks (whole shards of a
sharded array, whole chunks otherwise). zarrs checks the crc32c of every chunk it decodes whole, but decodes a
part of a chunk (one inner chunk of a shard, a few heads of a chunk) without checking it (zarrs 0.2.3); zarr-python
always decodes whole (inner) chunks and checks them. Other reads, and everything where zarrs cannot serve, go
through zarr-python's pipeline:

- zarrs not importable (a platform without wheels): no twin is opened.
- a store zarrs does not read (its HTTP client takes no ``storage_options``; no S3 through fsspec): opening the
  twin fails, and that field reads with zarr-python's pipeline.
- an array or a read zarrs does not support (a codec it lacks, strings, fancy indexing): zarrs itself hands it to
  zarr-python's pipeline (``codec_pipeline.strict`` is kept ``False``).

``HEADSTORE_CODEC_PIPELINE=zarr`` in the environment, or ``with prefer("zarr"):`` around ``open_store``, reads with
zarr-python's pipeline only; ``"auto"`` (the default) uses zarrs as above.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, cast

ZARRS = "zarrs.ZarrsCodecPipeline"
ENV = "HEADSTORE_CODEC_PIPELINE"
Choice = Literal["auto", "zarr"]

_preference: ContextVar[Choice | None] = ContextVar("headstore_codec_pipeline", default=None)
_window = threading.Lock()  # two threads opening twins must not restore each other's configuration


@contextmanager
def prefer(choice: Choice) -> Iterator[None]:
    """Within the block (this thread or task only), ``open_store`` reads with ``choice``:
    ``"zarr"`` zarr-python's pipeline only, ``"auto"`` zarrs where it serves."""
    if choice not in ("auto", "zarr"):
        raise ValueError(f"codec pipeline {choice!r}: choose 'auto' or 'zarr'")
    token = _preference.set(choice)
    try:
        yield
    finally:
        _preference.reset(token)


def _choice() -> Choice:
    chosen = _preference.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if env not in ("auto", "zarr"):
        raise ValueError(f"{ENV}={env!r}: choose 'auto' or 'zarr'")
    return cast(Choice, env)


def zarrs_available() -> bool:
    """zarrs imports and zarr finds its pipeline class (registered through zarrs' entry point)."""
    try:
        import zarr
        import zarrs  # noqa: F401
        from zarr.registry import get_pipeline_class
    except ImportError:
        return False
    with _window, zarr.config.set({"codec_pipeline.path": ZARRS}):
        try:
            get_pipeline_class()
        except Exception:  # BadConfigError: installed but not registered
            return False
    return True


def pipeline_name(arr: Any) -> str:
    """``"zarrs"`` when a ``zarr.Array`` reads through zarrs' Rust pipeline, else ``"zarr"``."""
    pipe = arr._async_array.codec_pipeline
    return "zarrs" if type(pipe).__module__.startswith("zarrs") and getattr(pipe, "impl", None) is not None else "zarr"


def zarrs_twin(arr: Any) -> Any | None:
    """The same array (same store object, same path) opened with zarrs' pipeline, or ``None`` where zarrs
    cannot serve it (not importable, ``prefer("zarr")``, a store it does not read)."""
    if _choice() == "zarr" or not zarrs_available():
        return None
    import zarr
    from zarr.core.array import AsyncArray

    settings = {"codec_pipeline.path": ZARRS, "codec_pipeline.strict": False, "codec_pipeline.validate_checksums": True}
    inner = arr._async_array
    try:  # the array's own metadata and store path: no second metadata read (over HTTP, a request per array)
        with _window, zarr.config.set(settings):
            twin = zarr.Array(AsyncArray(inner.metadata, inner.store_path, inner.config))
    except Exception:  # e.g. ValueError: storage options zarrs' HTTP client does not take
        return None
    return twin if pipeline_name(twin) == "zarrs" else None


class FastReads:
    """Array-like over a ``zarr.Array``: reads of whole codec chunks (whole shards when sharded) go to its zarrs
    twin, all other reads to the array itself."""

    def __init__(self, arr: Any, twin: Any | None):
        self.arr, self.twin = arr, twin
        self.shape, self.dtype, self.ndim = tuple(arr.shape), arr.dtype, arr.ndim
        self.unit = tuple(arr.shards or arr.chunks)

    def whole_chunks(self, key: Any) -> bool:
        """``key`` (a tuple of unit-step slices, as dask reads) starts and ends on codec-chunk boundaries."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != self.ndim or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            return False
        for k, n, u in zip(key, self.shape, self.unit, strict=True):
            start, stop, _ = k.indices(n)
            if start % u or (stop % u and stop != n) or stop <= start:
                return False
        return True

    def __getitem__(self, key: Any) -> Any:
        if self.twin is not None and self.whole_chunks(key):
            return self.twin[key]
        return self.arr[key]


def with_fast_reads(arr: Any) -> Any:
    """``arr`` wrapped in :class:`FastReads` when it is sharded and zarrs can serve it, else ``arr`` itself.

    Only sharded arrays: zarrs decodes a shard's inner chunks in parallel, but read one large plain chunk (a
    113 MB ``W_U``, uncompressed) at 0.46-0.48 GB/s where zarr-python read it at 1.1 GB/s (SmolLM2, page cache,
    2026-12-06; docs/benchmarks.md (l))."""
    if getattr(arr, "shards", None) is None:
        return arr
    twin = zarrs_twin(arr)
    return FastReads(arr, twin) if twin is not None else arr


# the most bytes one dask block of a field may hold when it is a whole shard; beyond (long sequences: a SmolLM2
# pattern shard of 8 x 1024 tokens is 9 GB) blocks stay the stored inner chunks, read by zarr-python
SHARD_BLOCK_MAX = 256 * 2**20


def read_chunks(arr: Any, chunks: tuple[tuple[int, ...], ...], *, by_batch: bool = True) -> tuple[Any, ...]:
    """Dask chunks for reading ``arr``: its shards, where it is sharded and a block holds at most ``SHARD_BLOCK_MAX``
    bytes, else ``chunks`` (what xarray chose: the stored chunks). ``by_batch`` (its first dim is ``batch``): the
    stored chunks along it, shards along every other dim. An activation field's shard is one batch chunk, so its
    blocks are whole shards (decoded and checked by zarrs); ``tokens``, one shard for the whole store, keeps the
    batch chunks every analyzer blocks by (reads of a part of it go to zarr-python). A weight (``W_O``: every
    layer in one shard) is one block."""
    shards = getattr(arr, "shards", None)
    if not shards:
        return chunks
    lead = max(chunks[0]) if by_batch else shards[0]
    if lead * math.prod(shards[1:]) * arr.dtype.itemsize > SHARD_BLOCK_MAX:
        return chunks
    return (chunks[0], *shards[1:]) if by_batch else tuple(shards)
