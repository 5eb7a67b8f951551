"""Weights once per model, the writing side: a shared weights store created (or reused), and ``pack``.

``headstore.store_schema.read.weights`` says what a weights store is and how a store finds and verifies its own.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.hashing import content_sha256
from headstore.store_schema.layout import ATTRS_KEY, SCHEMA_VERSION, WEIGHTS_ATTRS
from headstore.store_schema.paths import StorePath, is_local
from headstore.store_schema.provenance_parts import WeightsRef
from headstore.store_schema.read.guard import guarded_arrays
from headstore.store_schema.read.reader import read_provenance
from headstore.store_schema.read.weights import verify
from headstore.store_schema.strings import is_text
from headstore.store_schema.write.create import consolidate, write_strings, write_weights
from headstore.store_schema.write.durable import sync_folder, sync_tree


def ensure_weights_store(
    where: str | os.PathLike[str],
    shared: Mapping[str, np.ndarray],
    compute_missing: Callable[[], dict[str, np.ndarray]],
    model: Mapping[str, Any],
) -> str:
    """Create the weights store at ``where`` (``shared`` plus ``compute_missing()``, e.g. W_EE), or reuse
    the one there when it holds the same ``shared`` arrays; returns its sha256."""
    where = str(where)
    if not is_local(where) or Path(where).exists():
        return _reuse(where, shared)
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
    return sha


def _reuse(where: str, shared: Mapping[str, np.ndarray]) -> str:
    try:
        root = StorePath(where).open_group()
        attrs = root.attrs.get(WEIGHTS_ATTRS)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError) as e:
        raise HeadstoreError(f"--weights {where} exists but is not a weights store ({type(e).__name__})") from None
    if not isinstance(attrs, dict) or not isinstance(attrs.get("sha256"), str):
        raise HeadstoreError(f"--weights {where} is not a headstore weights store: choose another folder")
    if isinstance(root.get("vocab"), zarr.Array):  # schema 1: zarr-python's string type, which others refuse
        raise HeadstoreError(
            f"--weights {where} was written by an older headstore (vocab in zarr-python's string type, which other "
            "Zarr implementations cannot read): choose a new folder; the stores made with it still open"
        )
    arrays = guarded_arrays(root, where)
    for name, value in shared.items():
        if name not in arrays:
            raise HeadstoreError(f"--weights {where} lacks {name}: it holds another model's weights")
        stored = np.asarray(arrays[name][...])
        if stored.shape != value.shape or not np.array_equal(stored, value):
            raise HeadstoreError(
                f"--weights {where} holds another model's weights ({name} differs): choose another folder"
            )
    ref_path = os.path.abspath(where) if is_local(where) else where
    verify(where, WeightsRef(path=ref_path, sha256=attrs["sha256"], arrays=tuple(shared)), content=True)
    return str(attrs["sha256"])


def pack(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A self-contained copy of the local store ``src`` at ``out``: the arrays it takes from its weights
    store written into it (as a store made without ``--weights`` holds them), the reference dropped, and
    the strings of a schema-1 store in zarr-python's ``string`` type rewritten as bytes and offsets (the copy
    is schema version 2, readable by any Zarr v3 implementation). Written under a temporary name and renamed
    into place."""
    src, out = Path(src), Path(out)
    if not is_local(src):
        raise HeadstoreError(f"pack reads a local store; {src} is a URL: copy it locally first")
    prov = read_provenance(src)
    if out.exists():
        raise HeadstoreError(f"{out} already exists: choose a new path")
    ref = prov.weights_store
    arrays = {}
    if ref is not None:
        weights = guarded_arrays(verify(str(src), ref, content=True), str(StorePath.of(src).join(ref.path)))
        arrays = {name: np.asarray(weights[name][...]) for name in ref.arrays}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        rewritten = _portable_strings(tmp)
        if ref is not None or rewritten or prov.schema_version != SCHEMA_VERSION:
            root = zarr.open_group(str(tmp), mode="r+", zarr_format=3, use_consolidated=False)
            write_weights(root, arrays, prov.layout)
            attrs = prov.to_dict()
            attrs["weights_store"] = None
            attrs["schema_version"] = SCHEMA_VERSION  # every string array now bytes and offsets
            root.attrs[ATTRS_KEY] = attrs
            consolidate(str(tmp))
        sync_tree(tmp)
        os.rename(tmp, out)
        sync_folder(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _portable_strings(folder: Path) -> bool:
    """Rewrite each string array of the local store ``folder`` held in zarr-python's ``string`` type (schema 1)
    as bytes and offsets (``write_strings``); whether there was one."""
    root = zarr.open_group(str(folder), mode="r+", zarr_format=3, use_consolidated=False)
    old = [(name, arr) for name, arr in root.arrays() if is_text(arr.dtype)]
    for name, arr in old:
        values, dims = np.asarray(arr[...]), getattr(arr.metadata, "dimension_names", None) or ("batch",)
        shutil.rmtree(folder / name)
        write_strings(root, name, values, tuple(str(d) for d in dims))
    return bool(old)
