"""Weights hashed in one place: the weights store's content hash, and the provenance's record of a store's weights."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


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


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """The ``weights_sha256`` a store's provenance records: each weight's name then its raw bytes, in name
    order, ``W_EE`` left out (a function of the others). Unlike ``content_sha256`` it holds neither dtype
    nor shape; kept as it is so that stores stay byte-identical."""
    h = hashlib.sha256()
    for name in sorted(weights):
        if name == "W_EE":
            continue
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name]).tobytes())
    return h.hexdigest()
