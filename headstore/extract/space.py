"""Disk space around a run: the free space a plan needs before it starts, and the one-line error of a disk that
fills up mid-run (the store resumes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from headstore.extract.plan import Plan, gb
from headstore.store_schema import HeadstoreError


def existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free space of the filesystem that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(existing(path)).free


def check_space(plan: Plan) -> None:
    """Refuse to start when the store's filesystem has less free space than the plan still needs (each
    file rounded up to the filesystem's block: a store of small files takes more than its bytes)."""
    block = os.statvfs(existing(plan.out)).f_bsize
    need, free = plan.bytes_needed + plan.files_needed * block, free_bytes(plan.out)
    if free < need:
        raise HeadstoreError(
            f"not enough space at {plan.out}: the plan needs {gb(need)}, {gb(free)} free: free space, choose "
            "another --out, or pass --ignore-space to start anyway (a full disk stops it, resumable)"
        )


def disk_full(out: Path, n_sequences: int, batch_size: int) -> HeadstoreError:
    """The one-line error of a full disk mid-run (the store resumes: each batch is marked done last)."""
    from headstore.store_schema.read.reader import done_mask

    n_batches, done = -(-n_sequences // batch_size), 0
    if (out / "zarr.json").exists():
        try:
            mask = done_mask(out)
            done = sum(bool(mask[s : s + batch_size].all()) for s in range(0, mask.size, batch_size))
        except HeadstoreError:
            pass
    return HeadstoreError(
        f"disk full at {out} after {done} of {n_batches} batches: free space and rerun the same command to resume"
    )
