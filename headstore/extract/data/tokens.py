"""``tokens:FILE.npy[,COLUMNS]``: an integer array (batch, pos) used as is (no BOS added). Loaded without pickle.

``COLUMNS`` (a ``.jsonl``, ``.csv`` or ``.parquet`` file, one row per sequence) gives per-sequence
columns: integer and string columns are stored, ``NAME_str`` also as the token id ``NAME`` (see
``table``; ``_char``/``_word`` need a text and are refused here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset
from headstore.extract.data.table import FORMATS, sidecar_columns
from headstore.store_schema.errors import HeadstoreError


def build_tokens(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    if not arg:
        raise HeadstoreError("data 'tokens' needs a file: --data tokens:FILE.npy")
    sidecar = ""
    head, sep, tail = arg.rpartition(",")
    if sep and tail.endswith(tuple(FORMATS.values())):
        arg, sidecar = head, tail
    path = Path(arg)
    if not path.is_file():
        raise HeadstoreError(f"token file {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise HeadstoreError(f"{path} is not a .npy array of integers ({e}): save one with numpy.save") from e
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise HeadstoreError(f"{path} must hold a 2-d integer array (batch, pos), got {arr.dtype} {arr.shape}")
    vocab = len(tokenizer)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise HeadstoreError(f"{path} has token ids outside [0, {vocab}): wrong tokenizer?")
    options: dict[str, Any] = {"file": path.name}
    cols: dict[str, np.ndarray] = {}
    if sidecar:
        cols = sidecar_columns(sidecar, int(arr.shape[0]), tokenizer)
        options["columns_file"] = Path(sidecar).name
        options["columns"] = sorted(cols)
    if req.seq_len is not None:
        arr = arr[:, : req.seq_len]
    if req.n_seq is not None:
        arr = arr[: req.n_seq]
        cols = {k: v[: req.n_seq] for k, v in cols.items()}
    return TokenDataset("tokens", req.spec, arr.astype(np.int32), cols, options)
