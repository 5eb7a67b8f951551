"""Datasets: token arrays plus per-sequence metadata columns.

A spec is ``KIND`` or ``KIND:ARG``: ``ioi``, ``ioi-abc``, ``text[:PATHS]``, ``code-ifelse[:PATHS]``,
``tokens:FILE.npy[,COLUMNS]``, and the researcher's own prompts ``jsonl:FILE``, ``csv:FILE``,
``parquet:FILE`` (one prompt per row; see ``table``).
"""

from __future__ import annotations

from typing import Any

from headstore.extract.data.base import Builder, DataRequest, TokenDataset, bos_id, pad_id
from headstore.store_schema.errors import HeadstoreError

__all__ = ["Builder", "DataRequest", "TokenDataset", "bos_id", "build_dataset", "pad_id"]


def _builders() -> dict[str, Builder]:
    from headstore.extract.data import ifelse, ioi_data, repeated, table, text, tokens

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
