"""``tokens:FILE.npy``: an integer array (batch, pos) used as is (no BOS added). Loaded without pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.data import DataRequest, TokenDataset
from headstore.store_schema.errors import HeadstoreError


def build_tokens(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    if not arg:
        raise HeadstoreError("data 'tokens' needs a file: --data tokens:FILE.npy")
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
    if req.seq_len is not None:
        arr = arr[:, : req.seq_len]
    if req.n_seq is not None:
        arr = arr[: req.n_seq]
    return TokenDataset("tokens", req.spec, arr.astype(np.int32), {}, {"file": path.name})
