"""Put a finished batch's files on disk before the batch is marked done, and out of the page cache; the same
for a whole store or weights store before it is renamed into place.

A batch is marked done in the manifest only after its files are durable: ``fdatasync`` of each file,
then ``fsync`` of the folders that gained entries (zarr writes each file to a temporary name and
renames it). A power cut or a killed VM can then lose only batches not yet marked done, which a rerun
writes again; without it the manifest could say done for data still in the page cache.

The synced pages are then dropped from the page cache (``POSIX_FADV_DONTNEED``): an extraction streams
gigabytes that nobody reads back soon, the way ``dd oflag=nocache`` does. The next batch's writes reuse
the freed pages instead of growing the cache into fresh memory, which on a VM with free-page reporting
costs the kernel ~3 ms of CPU per MB (docs/benchmarks.md, (b)). The writer's large files skip the cache
altogether (``direct.py``); this still syncs their folders and any tail written through the cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def batch_files(field_dir: Path, batch: int) -> list[Path]:
    """Every chunk or shard file of ``batch`` in a local array folder: ``c/<batch>`` is a file (1-D
    arrays) or a folder of them."""
    top = field_dir / "c" / str(batch)
    if top.is_file():
        return [top]
    return sorted(p for p in top.rglob("*") if p.is_file() and not p.name.endswith(".partial"))


def make_durable(files: Iterable[Path], stop_at: Path) -> None:
    """fdatasync each file and drop its pages from the cache, then fsync every folder from its parent up to
    ``stop_at`` (included), so the renames that created them survive a crash too."""
    folders: set[Path] = set()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            _datasync(fd)
            if hasattr(os, "posix_fadvise"):  # Linux and most Unixes; not macOS or Windows
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        d = f.parent
        while d not in folders:
            folders.add(d)
            if d == stop_at or d == d.parent:
                break
            d = d.parent
    _sync_folders(sorted(folders, key=lambda p: len(p.parts), reverse=True))  # deepest first


def _sync_folders(folders: Iterable[Path]) -> None:
    if os.name == "nt":  # Windows cannot open a folder to fsync it
        return
    for d in folders:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_tree(top: Path) -> None:
    """Make every file and folder under ``top`` durable (before ``top`` is renamed into place)."""
    make_durable(sorted(p for p in top.rglob("*") if p.is_file()), top)


def sync_folder(folder: Path) -> None:
    """fsync ``folder``, so an entry just renamed into it survives a crash."""
    _sync_folders([folder])


def _datasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)
