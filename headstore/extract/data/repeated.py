"""``repeated-random``: random token sequences repeated twice after BOS, the data that makes induction
heads visible (Olsson et al., "In-context learning and induction heads").

Each sequence is ``[BOS, t_1 .. t_n, t_1 .. t_n]``: ``n`` tokens drawn uniformly, without replacement
within a sequence (so every token of the first half occurs there once), from the vocabulary less its
special tokens, then the same ``n`` again. Length rule: ``n = (seq_len - 1) // 2`` with BOS, so a
sequence has ``1 + 2n`` tokens: ``seq_len`` when it is odd, ``seq_len - 1`` when it is even
(``--no-prepend-bos``: ``n = seq_len // 2``, ``2n`` tokens). Default ``seq_len`` 101 (``n`` = 50).
Seeded by ``--seed``. Column ``repeat_offset`` = ``n``: the token at ``q`` in the second half repeats
the one at ``q - n``, so an induction head at ``q`` attends to ``q - n + 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset, bos_id
from headstore.store_schema.errors import HeadstoreError

DEFAULT_SEQ_LEN = 101
DEFAULT_N_SEQ = 64


def special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens (BOS, EOS, PAD, chat markers...), added tokens marked special included."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return ids


def build_repeated(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    if arg:
        raise HeadstoreError(f"data 'repeated-random' takes no argument (got {arg!r}): set the length with --seq-len")
    seq_len = req.seq_len or DEFAULT_SEQ_LEN
    n_seq = req.n_seq or DEFAULT_N_SEQ
    n = (seq_len - 1) // 2 if req.prepend_bos else seq_len // 2
    if n < 1:
        raise HeadstoreError(f"--seq-len {seq_len} leaves no room for a repeated half: use at least 3")
    special = special_ids(tokenizer)
    pool = np.asarray([i for i in range(len(tokenizer)) if i not in special], dtype=np.int32)
    if pool.size < n:
        raise HeadstoreError(f"the vocabulary has {pool.size} non-special tokens, fewer than n = {n}: lower --seq-len")
    rng = np.random.default_rng(req.seed)
    half = np.stack([rng.choice(pool, size=n, replace=False) for _ in range(n_seq)]).astype(np.int32)
    tokens = np.concatenate([half, half], axis=1)
    if req.prepend_bos:
        tokens = np.concatenate([np.full((n_seq, 1), bos_id(tokenizer), np.int32), tokens], axis=1)
    cols = {"repeat_offset": np.full(n_seq, n, np.int32)}
    return TokenDataset(
        "repeated-random", req.spec, tokens, cols, {"seed": req.seed, "n": n, "n_candidates": int(pool.size)}
    )
