"""What every data source makes and takes: ``TokenDataset``, ``DataRequest``, and the BOS/pad ids.

The builders (``ioi_data``, ``text``, ...) import these from here; the registry in ``headstore.extract.data``
imports the builders. Kept apart so that the two never import each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.provenance_parts import DatasetInfo


@dataclass(frozen=True)
class TokenDataset:
    """``tokens`` (batch, pos) int32 and ``columns`` name -> (batch,) array."""

    kind: str
    spec: str
    tokens: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def sha256(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
        for name in sorted(self.columns):
            h.update(name.encode())
            h.update(np.asarray(self.columns[name]).astype(str).tobytes())
        return h.hexdigest()

    def describe(self) -> DatasetInfo:
        """The dataset as the store's provenance records it."""
        return DatasetInfo(
            kind=self.kind,
            spec=self.spec,
            options=self.options,
            n_sequences=int(self.tokens.shape[0]),
            sha256=self.sha256(),
        )


@dataclass(frozen=True)
class DataRequest:
    spec: str
    n_seq: int | None
    seq_len: int | None
    seed: int
    prepend_bos: bool


Builder = Callable[[str, DataRequest, Any], TokenDataset]


def bos_id(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise HeadstoreError("the tokenizer has no BOS or EOS token: pass --no-prepend-bos")
    return int(bos)


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0
