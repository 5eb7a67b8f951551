"""Strings in core Zarr v3 data types, so that every array of a store opens in any Zarr v3 implementation.

Zarr v3's core data types hold no strings (zarr-python's ``string`` is an extension that others, e.g.
tensorstore, refuse). A 1-D array ``NAME`` of n strings (``vocab``, string columns such as ``template``) is
stored as two arrays, Apache Arrow's layout of a string column:

- ``NAME_bytes``: uint8, the strings' UTF-8 encodings one after another;
- ``NAME_offsets``: int64 (n + 1,), ``offsets[0] = 0``; string i is ``NAME_bytes[offsets[i]:offsets[i + 1]]``.

``NAME_offsets`` carries the attribute ``headstore_string`` = ``{"name": NAME, "dims": [DIM], "bytes":
"NAME_bytes"}``; ``open_store`` presents the pair as the string variable ``NAME`` with dims ``(DIM,)``.
Stores of schema version 1 hold ``NAME`` itself in zarr-python's ``string`` type; they are read as they are.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

STRING_ATTR = "headstore_string"


def is_text(dtype: Any) -> bool:
    """Whether arrays of ``dtype`` hold strings (numpy str, object, or StringDType as zarr reads them)."""
    return np.dtype(dtype).kind in "UOT"


def stored_names(name: str) -> tuple[str, str]:
    """The two arrays a string array ``name`` is stored as: ``(NAME_bytes, NAME_offsets)``."""
    return f"{name}_bytes", f"{name}_offsets"


def encode(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 UTF-8 bytes, int64 (n + 1,) offsets) of the 1-D string array ``values``."""
    encoded = [str(s).encode("utf-8") for s in np.asarray(values).ravel().tolist()]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode(data: Any, offsets: Any) -> np.ndarray:
    """The (n,) strings (numpy StringDType, as zarr-python reads its ``string`` type) that ``encode`` stored."""
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    ends = np.asarray(offsets, dtype=np.int64).tolist()
    texts = [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(ends)]
    return np.array(texts, dtype=np.dtypes.StringDType())
