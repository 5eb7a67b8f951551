"""Weights once per model: a shared weights store referenced by activation stores.

A store made with ``extract --weights DIR`` does not carry the model-wide, vocabulary-sized weights
(``SHARED``: W_E, W_EE, W_U, b_U, W_pos, vocab; ~340 MB for SmolLM2, GBs for 128k-vocabulary
models). Its attr ``weights_store`` names a weights store instead: ``path`` (relative to the store,
or a URL), ``sha256`` (of the weights store's arrays, ``content_sha256``) and ``arrays`` (the ones
this store takes from it). ``open_store`` verifies the hash and presents the same Dataset as a
self-contained store; ``pack`` writes a self-contained copy. Per-layer weights (W_Q, ..., b_O) and the
rotary tables depend on ``--layers`` and ``seq_len`` and stay in each store.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from headstore.store_schema.durable import sync_folder, sync_tree
from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.provenance_parts import WeightsRef

SHARED = ("W_E", "W_EE", "W_U", "b_U", "W_pos", "vocab")
WEIGHTS_ATTRS = "headstore_weights"
_VERIFIED: dict[tuple[Any, ...], str] = {}  # (where, file stats) -> sha256, once per process


def content_sha256(arrays: Mapping[str, Any]) -> str:
    """sha256 over the arrays in name order: name, dtype, shape, then the values in C order (strings as
    UTF-8, NUL-separated). ``arrays`` may be zarr arrays: they are read ~16 MB of leading-axis rows at
    a time, so verifying a weights store holds one block, not the vocabulary-sized matrices."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        dtype, shape = np.dtype(a.dtype), tuple(a.shape)
        text = dtype.kind in "UOT"  # str arrays come back from zarr as object or StringDType
        h.update(f"{name}\0{'str' if text else dtype.str}\0{shape}\0".encode())
        if text:
            h.update("\0".join(str(x) for x in np.asarray(a[...]).ravel().tolist()).encode())
            continue
        if not shape:
            h.update(np.asarray(a[...], dtype=dtype).tobytes())
            continue
        rows = max(1, 2**24 // max(1, dtype.itemsize * math.prod(shape[1:])))
        for i in range(0, shape[0], rows):
            h.update(np.ascontiguousarray(a[i : i + rows]).data.cast("B"))
    return h.hexdigest()


def resolve(store: str, ref_path: str) -> str:
    """Where a reference points: a URL as is, else relative to the store (a folder or a URL)."""
    if "://" in ref_path or os.path.isabs(ref_path):
        return ref_path
    if "://" in store:
        scheme, rest = store.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest.rstrip('/'), ref_path))}"
    return os.path.normpath(os.path.join(store, ref_path))


def relative_ref(store: str | os.PathLike[str], weights: str | os.PathLike[str]) -> str:
    """The path recorded in a store: ``weights`` relative to the store folder (a URL as is)."""
    if "://" in str(weights):
        return str(weights)
    return os.path.relpath(os.path.abspath(weights), os.path.abspath(store))


def _group(where: str, storage_options: dict[str, Any] | None, mode: str = "r") -> zarr.Group:
    opts = storage_options if "://" in where and not where.startswith("file://") else None
    return zarr.open_group(where, mode=mode, zarr_format=3, storage_options=opts)  # type: ignore[arg-type]


def read_arrays(where: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    root = _group(where, storage_options)
    return {name: np.asarray(a[...]) for name, a in root.arrays()}


def _stats(where: str) -> tuple[Any, ...]:
    if "://" in where:
        return (where,)
    return tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(where).rglob("*")) if p.is_file()
    )


def verify(store: str, ref: WeightsRef, storage_options: dict[str, Any] | None = None, *, fresh: bool = False) -> str:
    """The resolved location of ``store``'s weights store, after checking its arrays hash to
    ``ref.sha256`` (once per process while its files are unchanged, unless ``fresh``); one-line
    errors by name."""
    where = resolve(store, ref.path)
    short = ref.sha256[:12]
    try:
        root = _group(where, storage_options)
        attrs = root.attrs.get(WEIGHTS_ATTRS)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError):
        raise HeadstoreError(
            f"{store} takes its weights from the weights store {ref.path} ({where}, sha256 {short}...), which is "
            "missing: put it back there, or share a self-contained copy made with `headstore pack`"
        ) from None
    if not isinstance(attrs, dict):
        raise HeadstoreError(f"{where} (weights store of {store}) is not a headstore weights store")
    key = (where, _stats(where))
    got = None if fresh else _VERIFIED.get(key)
    if got is None:
        missing = [n for n in ref.arrays if n not in root]
        if missing:
            raise HeadstoreError(f"weights store {where} lacks {', '.join(missing)}, which {store} takes from it")
        got = content_sha256(dict(root.arrays()))  # read block by block
        _VERIFIED[key] = got
    if got != ref.sha256:
        raise HeadstoreError(
            f"weights store {where} holds different weights (sha256 {got[:12]}...) from those {store} was made "
            f"with ({short}...): it was changed or replaced; restore it or re-extract"
        )
    return where


def open_weights(store: str, ref: WeightsRef, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The arrays ``store`` takes from its weights store, lazily, after ``verify``."""
    where = verify(store, ref, storage_options)
    opts = storage_options if "://" in where else None
    wds = xr.open_zarr(where, chunks={}, consolidated=True, storage_options=opts, zarr_format=3)
    return wds[list(ref.arrays)]


def ensure_weights_store(
    where: str | os.PathLike[str],
    shared: Mapping[str, np.ndarray],
    compute_missing: Callable[[], dict[str, np.ndarray]],
    model: Mapping[str, Any],
) -> str:
    """Create the weights store at ``where`` (``shared`` plus ``compute_missing()``, e.g. W_EE), or reuse
    the one there when it holds the same ``shared`` arrays; returns its sha256."""
    where = str(where)
    if "://" in where or Path(where).exists():
        return _reuse(where, shared)
    from headstore.store_schema.create import consolidate, write_weights

    arrays = {**shared, **compute_missing()}
    sha = content_sha256(arrays)
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        root.attrs[WEIGHTS_ATTRS] = {"sha256": sha, "arrays": sorted(arrays), "model": dict(model)}
        write_weights(root, arrays, "sharded")
        consolidate(str(tmp))
        sync_tree(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            return _reuse(where, shared)  # a concurrent extraction made it first
        sync_folder(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _VERIFIED[(where, _stats(where))] = sha
    return sha


def _reuse(where: str, shared: Mapping[str, np.ndarray]) -> str:
    try:
        root = _group(where, None)
        attrs = root.attrs.get(WEIGHTS_ATTRS)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError) as e:
        raise HeadstoreError(f"--weights {where} exists but is not a weights store ({type(e).__name__})") from None
    if not isinstance(attrs, dict) or not isinstance(attrs.get("sha256"), str):
        raise HeadstoreError(f"--weights {where} is not a headstore weights store: choose another folder")
    for name, value in shared.items():
        if name not in root:
            raise HeadstoreError(f"--weights {where} lacks {name}: it holds another model's weights")
        stored = np.asarray(root[name][...])  # type: ignore[index]
        if stored.shape != value.shape or not np.array_equal(stored, value):
            raise HeadstoreError(
                f"--weights {where} holds another model's weights ({name} differs): choose another folder"
            )
    ref_path = where if "://" in where else os.path.abspath(where)
    verify(where, WeightsRef(path=ref_path, sha256=attrs["sha256"], arrays=tuple(shared)))
    return str(attrs["sha256"])


def pack(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A self-contained copy of the local store ``src`` at ``out``: the arrays it takes from its weights
    store written into it (as a store made without ``--weights`` holds them), the reference dropped.
    Written under a temporary name and renamed into place."""
    from headstore.store_schema.create import consolidate, write_weights
    from headstore.store_schema.layout import ATTRS_KEY
    from headstore.store_schema.reader import read_provenance

    src, out = Path(src), Path(out)
    if "://" in str(src):
        raise HeadstoreError(f"pack reads a local store; {src} is a URL: copy it locally first")
    prov = read_provenance(src)
    if out.exists():
        raise HeadstoreError(f"{out} already exists: choose a new path")
    ref = prov.weights_store
    arrays = {}
    if ref is not None:
        verify(str(src), ref)
        where = resolve(str(src), ref.path)
        root = _group(where, None)
        arrays = {name: np.asarray(root[name][...]) for name in ref.arrays}  # type: ignore[index]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        if ref is not None:
            root = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
            write_weights(root, arrays, prov.layout)
            attrs = prov.to_dict()
            attrs["weights_store"] = None
            root.attrs[ATTRS_KEY] = attrs
            consolidate(str(tmp))
        sync_tree(tmp)
        os.rename(tmp, out)
        sync_folder(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
