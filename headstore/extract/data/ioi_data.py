"""``ioi`` and ``ioi-abc`` datasets: IOI prompts (or their ABC twins) with IO/S1/S2/end positions.

Only names that are one token for this tokenizer are used. Prompts are right-padded to the
longest; ``length`` holds each prompt's real length and ``end_pos = length - 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headstore.extract.data.base import DataRequest, TokenDataset, bos_id, pad_id
from headstore.extract.data.ioi_prompts import NAMES, abc_names, sample_prompts
from headstore.store_schema.errors import HeadstoreError


def single_token_names(tokenizer: Any) -> list[str]:
    return [n for n in NAMES if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]


def _find(seq: list[int], tok: int, start: int = 0) -> int:
    return seq.index(tok, start)


def build_ioi(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    abc = req.spec.split(":")[0] == "ioi-abc"
    names = single_token_names(tokenizer)
    if len(names) < 3:
        raise HeadstoreError("this tokenizer has fewer than 3 single-token names: IOI data cannot be built for it")
    n = req.n_seq or 64
    prompts = sample_prompts(n, names, req.seed)
    triples = abc_names(prompts, names, req.seed)

    def ids(name: str) -> int:
        return int(tokenizer.encode(" " + name, add_special_tokens=False)[0])

    rows, io_pos, s1_pos, s2_pos, io_tok, s_tok = [], [], [], [], [], []
    for p, (a, b, c) in zip(prompts, triples, strict=True):
        text = p.text(a, b, c) if abc else p.text()
        seq = list(tokenizer.encode(text, add_special_tokens=False))
        if req.prepend_bos:
            seq = [bos_id(tokenizer), *seq]
        # Positions come from the IOI prompt so the ABC twin aligns with it token for token.
        ref = list(tokenizer.encode(p.text(), add_special_tokens=False))
        if req.prepend_bos:
            ref = [bos_id(tokenizer), *ref]
        if len(ref) != len(seq):
            raise HeadstoreError("an ABC prompt tokenised to a different length than its IOI twin")
        io_t, s_t = ids(p.io), ids(p.s)
        i_io = _find(ref, io_t)
        i_s1 = _find(ref, s_t)
        i_s2 = _find(ref, s_t, i_s1 + 1)
        rows.append(seq)
        io_pos.append(i_io)
        s1_pos.append(i_s1)
        s2_pos.append(i_s2)
        io_tok.append(seq[i_io])
        s_tok.append(seq[i_s1])
    length = np.asarray([len(r) for r in rows], np.int32)
    seq_len = req.seq_len or int(length.max())
    if length.max() > seq_len:
        raise HeadstoreError(f"IOI prompts need {int(length.max())} tokens but --seq-len is {seq_len}: raise it")
    tokens = np.full((n, seq_len), pad_id(tokenizer), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    cols = {
        "io_pos": np.asarray(io_pos, np.int32),
        "s1_pos": np.asarray(s1_pos, np.int32),
        "s2_pos": np.asarray(s2_pos, np.int32),
        "end_pos": length - 1,
        "length": length,
        "io_token": np.asarray(io_tok, np.int32),
        "s_token": np.asarray(s_tok, np.int32),
        "template": np.asarray([p.template for p in prompts]),
    }
    return TokenDataset("ioi-abc" if abc else "ioi", req.spec, tokens, cols, {"seed": req.seed, "n_names": len(names)})
