"""Weights once per model, the reading side: a store's shared weights store found, verified and opened.

A store made with ``extract --weights DIR`` does not carry the model-wide, vocabulary-sized weights
(``SHARED``: W_E, W_EE, W_U, b_U, W_pos, vocab; ~340 MB for SmolLM2, GBs for 128k-vocabulary
models). Its attr ``weights_store`` names a weights store instead: ``path`` (relative to the store,
or a URL), ``sha256`` (of the weights store's arrays, ``hashing.content_sha256``) and ``arrays`` (the ones
this store takes from it). ``open_store`` verifies the hash and presents the same Dataset as a
self-contained store; ``headstore.store_schema.write.weights.pack`` writes a self-contained copy. Per-layer
weights (W_Q, ..., b_O) and the rotary tables depend on ``--layers`` and ``seq_len`` and stay in each store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.hashing import content_sha256
from headstore.store_schema.layout import WEIGHTS_ATTRS
from headstore.store_schema.paths import StorePath, is_local
from headstore.store_schema.provenance_parts import WeightsRef
from headstore.store_schema.read.guard import guarded_arrays, lazy_dataset

VERIFIED: dict[tuple[Any, ...], str] = {}  # (where, file stats) -> sha256, once per process


def read_arrays(where: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    root = StorePath.of(where, storage_options).open_group()
    return {name: np.asarray(a[...]) for name, a in guarded_arrays(root, where).items()}


def file_stats(where: str) -> tuple[Any, ...]:
    """What says a local weights store's files are unchanged since they were hashed (a URL: itself)."""
    if not is_local(where):
        return (where,)
    return tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(where).rglob("*")) if p.is_file()
    )


def verify(
    store: str, ref: WeightsRef, storage_options: dict[str, Any] | None = None, *, fresh: bool = False
) -> zarr.Group:
    """The group of ``store``'s weights store, after checking its arrays hash to ``ref.sha256`` (once per
    process while its files are unchanged, unless ``fresh``); one-line errors by name."""
    where = StorePath.of(store, storage_options).join(ref.path)
    short = ref.sha256[:12]
    try:
        root = where.open_group()
        attrs = root.attrs.get(WEIGHTS_ATTRS)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError):
        raise HeadstoreError(
            f"{store} takes its weights from the weights store {ref.path} ({where}, sha256 {short}...), which is "
            "missing: put it back there, or share a self-contained copy made with `headstore pack`"
        ) from None
    if not isinstance(attrs, dict):
        raise HeadstoreError(f"{where} (weights store of {store}) is not a headstore weights store")
    key = (where.url, file_stats(where.url))
    got = None if fresh else VERIFIED.get(key)
    if got is None:
        arrays = guarded_arrays(root, where.url)  # vocab as strings, however it is stored
        missing = [n for n in ref.arrays if n not in arrays]
        if missing:
            raise HeadstoreError(f"weights store {where} lacks {', '.join(missing)}, which {store} takes from it")
        got = content_sha256(arrays)  # read block by block
        VERIFIED[key] = got
    if got != ref.sha256:
        raise HeadstoreError(
            f"weights store {where} holds different weights (sha256 {got[:12]}...) from those {store} was made "
            f"with ({short}...): it was changed or replaced; restore it or re-extract"
        )
    return root


def open_weights(store: str, ref: WeightsRef, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The arrays ``store`` takes from its weights store, lazily (reads guarded), after ``verify``."""
    root = verify(store, ref, storage_options)
    where = StorePath.of(store, storage_options).join(ref.path)
    return lazy_dataset(root, where.url)[list(ref.arrays)]
