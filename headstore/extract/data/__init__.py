"""Datasets: token arrays plus per-sequence metadata columns.

A spec is ``KIND`` or ``KIND:ARG``: ``ioi``, ``ioi-abc``, ``text[:PATHS]``, ``code-ifelse[:PATHS]``,
``tokens:FILE.npy[,COLUMNS]``, and the researcher's own prompts ``jsonl:FILE``, ``csv:FILE``,
``parquet:FILE`` (one prompt per row; see ``table``), and Hugging Face datasets
``hf:NAME[:CONFIG][:SPLIT][,OPTION...]`` (documents packed into windows; see ``hf``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headstore.store_schema.errors import HeadstoreError


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

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "options": self.options,
            "n_sequences": int(self.tokens.shape[0]),
            "sha256": self.sha256(),
        }


@dataclass(frozen=True)
class DataRequest:
    spec: str
    n_seq: int | None
    seq_len: int | None
    seed: int
    prepend_bos: bool


Builder = Callable[[str, DataRequest, Any], TokenDataset]


def _builders() -> dict[str, Builder]:
    from headstore.extract.data import hf, ifelse, ioi_data, repeated, table, text, tokens

    return {
        "ioi": ioi_data.build_ioi,
        "ioi-abc": ioi_data.build_ioi,
        "text": text.build_text,
        "code-ifelse": ifelse.build_ifelse,
        "tokens": tokens.build_tokens,
        "repeated-random": repeated.build_repeated,
        "jsonl": table.build_table,
        "csv": table.build_table,
        "parquet": table.build_table,
        "hf": hf.build_hf,
    }


def build_dataset(req: DataRequest, tokenizer: Any, n_ctx: int) -> TokenDataset:
    kind, _, arg = req.spec.partition(":")
    builders = _builders()
    if kind not in builders:
        raise HeadstoreError(f"unknown data {kind!r}: choose from {', '.join(builders)} (e.g. text:docs/*.txt)")
    if req.seq_len is not None and req.seq_len > n_ctx:
        raise HeadstoreError(f"--seq-len {req.seq_len} is over the model's context of {n_ctx} tokens: lower it")
    if req.seq_len is not None and req.seq_len < 2:
        raise HeadstoreError(f"--seq-len {req.seq_len} is too short: use at least 2")
    if req.n_seq is not None and req.n_seq <= 0:
        raise HeadstoreError(f"--n-seq must be positive, got {req.n_seq}")
    ds = builders[kind](arg, req, tokenizer)
    if ds.tokens.shape[0] == 0:
        raise HeadstoreError(f"data {req.spec!r} gave no sequences: give more input or a shorter --seq-len")
    if ds.tokens.shape[1] > n_ctx:
        raise HeadstoreError(
            f"data {req.spec!r} has sequences of {ds.tokens.shape[1]} tokens, over the model's context of {n_ctx}"
        )
    return ds


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
