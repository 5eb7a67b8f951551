"""Weights once per model, the reading side: a store's shared weights store found, verified and opened.

A store made with ``extract --weights DIR`` does not carry the model-wide, vocabulary-sized weights
(``SHARED``: W_E, W_EE, W_U, b_U, W_pos, vocab; ~340 MB for SmolLM2, GBs for 128k-vocabulary
models). Its attr ``weights_store`` names a weights store instead: ``path`` (relative to the store,
or a URL), ``sha256`` (of the weights store's arrays, ``hashing.content_sha256``) and ``arrays`` (the ones
this store takes from it). ``open_store`` checks the weights store's identity from its metadata (the
sha256 it recorded about itself, its manifest, shapes and dtypes: nothing of the arrays is downloaded),
each chunk's crc32c when the chunk is read, and presents the same Dataset as a self-contained store;
``validate`` hashes every array; ``headstore.store_schema.write.weights.pack`` writes a self-contained copy. Per-layer
weights (W_Q, ..., b_O) and the rotary tables depend on ``--layers`` and ``seq_len`` and stay in each store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.hashing import content_sha256
from headstore.store_schema.layout import WEIGHTS, WEIGHTS_ATTRS
from headstore.store_schema.paths import StorePath
from headstore.store_schema.provenance_parts import WeightsRef
from headstore.store_schema.read.guard import guarded_arrays, lazy_dataset
from headstore.store_schema.strings import STRING_ATTR, stored_names

MODEL_DIMS = ("d_vocab", "d_model", "n_ctx")  # the sizes a store's model config fixes for its shared arrays


def read_arrays(where: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    root = StorePath.of(where, storage_options).open_group()
    return {name: np.asarray(a[...]) for name, a in guarded_arrays(root, where).items()}


def verify(
    store: str,
    ref: WeightsRef,
    storage_options: dict[str, Any] | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
    content: bool = False,
) -> zarr.Group:
    """The group of ``store``'s weights store, after checking from its metadata alone that it is the one
    ``ref`` names: the sha256 it recorded about itself at creation is ``ref.sha256``, its manifest (attr
    ``arrays``) and its arrays hold ``ref.arrays``, and each has the model's ``sizes`` (d_vocab, d_model,
    n_ctx) along its named dims, float32 for weights. Every chunk's crc32c is checked when it is read.
    ``content`` (validate, pack) also hashes every array against the record. One-line errors by name."""
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
    if not isinstance(attrs, dict) or not isinstance(attrs.get("sha256"), str):
        raise HeadstoreError(f"{where} (weights store of {store}) is not a headstore weights store")
    recorded = str(attrs["sha256"])
    if recorded != ref.sha256:
        raise HeadstoreError(
            f"weights store {where} holds different weights (sha256 {recorded[:12]}...) from those {store} was "
            f"made with ({short}...): it was changed or replaced; restore it or re-extract"
        )
    listed = set(attrs.get("arrays") or ())
    missing = [n for n in ref.arrays if n not in listed or not (n in root or stored_names(n)[1] in root)]
    if missing:
        raise HeadstoreError(f"weights store {where} lacks {', '.join(missing)}, which {store} takes from it")
    for name in ref.arrays:
        _check_metadata(root, name, sizes or {}, f"weights store {where}", store)
    if content and (got := content_sha256(guarded_arrays(root, where.url))) != recorded:  # read block by block
        raise HeadstoreError(
            f"weights store {where}: its arrays hash to sha256 {got[:12]}..., not the {recorded[:12]}... recorded "
            f"at its creation and by {store}: it was changed; restore it or re-extract"
        )
    return root


def _check_metadata(root: zarr.Group, name: str, sizes: Mapping[str, int], label: str, store: str) -> None:
    """Array ``name`` of a weights store has ``sizes`` along its named dims (and is float32 if a weight); a
    string array stored as bytes + offsets (``headstore.store_schema.strings``) by its offsets' length."""
    if name not in root:  # NAME_bytes + NAME_offsets: n strings have n + 1 offsets
        offsets = root[stored_names(name)[1]]
        assert isinstance(offsets, zarr.Array)
        spec = offsets.attrs.get(STRING_ATTR)
        dims = tuple(spec.get("dims") or ()) if isinstance(spec, dict) else ()
        got = dict(zip(dims, (offsets.shape[0] - 1,), strict=False))
        arr: zarr.Array | None = None
    else:
        node = root[name]
        assert isinstance(node, zarr.Array)
        arr = node
        dims = tuple(arr.metadata.dimension_names or ()) if hasattr(arr.metadata, "dimension_names") else ()
        got = dict(zip(dims, arr.shape, strict=False))
    wrong = [f"{d} {got[d]} (not {sizes[d]})" for d in MODEL_DIMS if d in got and d in sizes and got[d] != sizes[d]]
    if arr is not None and name in WEIGHTS and arr.dtype != np.float32:
        wrong.append(f"dtype {arr.dtype} (not float32)")
    if wrong:
        raise HeadstoreError(
            f"{label} holds {name} with {', '.join(wrong)}: another model's weights than {store}'s; restore it or "
            "re-extract"
        )


def open_weights(
    store: str, ref: WeightsRef, storage_options: dict[str, Any] | None = None, sizes: Mapping[str, int] | None = None
) -> xr.Dataset:
    """The arrays ``store`` takes from its weights store, lazily (reads guarded, each chunk's crc32c checked),
    after ``verify`` (metadata only: nothing of the arrays is read on open)."""
    root = verify(store, ref, storage_options, sizes=sizes)
    where = StorePath.of(store, storage_options).join(ref.path)
    return lazy_dataset(root, where.url)[list(ref.arrays)]
