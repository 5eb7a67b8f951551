"""What ``headstore info`` reports, as a plain dict."""

from __future__ import annotations

from typing import Any

import numpy as np

from headstore.store_schema.io import _is_local, array_nbytes_on_disk, count_files, done_mask, read_provenance


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
    sizes = array_nbytes_on_disk(path) if _is_local(path) else {}
    total = sum(sizes.values())
    return {
        "provenance": prov.to_dict(),
        "n_sequences": int(done.size),
        "n_complete": int(done.sum()),
        "done_ranges": done_ranges(done),
        "sizes": {k: (v, v / n_tokens) for k, v in sizes.items()},
        "total_bytes": total,
        "bytes_per_token": total / n_tokens,
        "n_files": count_files(path) if _is_local(path) else None,
    }
