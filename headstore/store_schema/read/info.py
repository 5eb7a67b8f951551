"""What ``headstore info`` reports, as a plain dict, and a local store's bytes and files on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from headstore.store_schema.paths import is_local
from headstore.store_schema.read.reader import done_mask, read_provenance


def done_ranges(done: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) ranges of completed sequences."""
    out, start = [], None
    for i, d in enumerate([*done.tolist(), False]):
        if d and start is None:
            start = i
        elif not d and start is not None:
            out.append((start, i))
            start = None
    return out


def store_info(path: str) -> dict[str, Any]:
    prov = read_provenance(path)
    done = done_mask(path)
    n_tokens = max(int(done.size) * prov.seq_len, 1)
    sizes = array_nbytes_on_disk(path) if is_local(path) else {}
    total = sum(sizes.values())
    return {
        "provenance": prov.to_dict(),
        "n_sequences": int(done.size),
        "n_complete": int(done.sum()),
        "done_ranges": done_ranges(done),
        "sizes": {k: (v, v / n_tokens) for k, v in sizes.items()},
        "total_bytes": total,
        "bytes_per_token": total / n_tokens,
        "n_files": count_files(path) if is_local(path) else None,
    }


def count_files(path: str | os.PathLike[str]) -> int:
    """Files in a local store (metadata included): what a Hub repository or an object store counts."""
    return sum(len(files) for _, _, files in os.walk(path))


def array_nbytes_on_disk(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes on disk per top-level array of a local store."""
    out: dict[str, int] = {}
    root = Path(path)
    for child in sorted(root.iterdir()):
        if child.is_dir():
            out[child.name] = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
    return out
