"""(d) Head census of every head from the store (head_scores, all kinds, + attention_stats) vs
TransformerLens's ``detect_head`` per sequence on the live model, on the same tokens of a SmolLM2-135M
``repeated-random`` store.

    python bench/census.py [--quick] [--model smollm2-135m] [--n-seq 8] [--seq-len 101]

``detect_head`` takes prompt strings; random tokens do not survive decode -> encode, so it is handed the
store's token tensor through a pass-through ``to_tokens`` (the tokenizer's cost is left out, in its
favour). Two live timings: as documented (``detect_head(model, prompt, kind)``: one forward pass with a
full cache per kind and sequence) and the cheapest use (one ``run_with_cache`` per sequence, shared by
the five calls with ``cache=``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

KINDS = ("previous_token", "duplicate_token", "induction", "bos", "self")
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


class TokensIn:
    """The bridge, with ``to_tokens`` passing a token tensor through (detect_head reads cfg, to_tokens,
    run_with_cache)."""

    def __init__(self, bridge: Any):
        self._bridge = bridge

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bridge, name)

    def to_tokens(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def detection(kind: str, n: int) -> Any:
    import torch

    if kind in TL_NAMES:
        return TL_NAMES[kind]
    d = torch.zeros(n, n)
    if kind == "bos":
        d[:, 0] = 1.0
    else:
        d.fill_diagonal_(1.0)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=101)
    args = ap.parse_args()
    n_seq = 2 if args.quick else args.n_seq
    repeat = 1 if args.quick else 3

    import torch
    from transformer_lens.head_detector import detect_head

    from headstore import open_store
    from headstore.analyze import attention_stats, head_scores
    from headstore.extract.models import load_model

    path = C.store(args.model, "repeated-random", n_seq, n_seq, fields=("tokens", "pattern"), seq_len=args.seq_len)
    ds = open_store(path)
    toks = ds["tokens"].values
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]

    def census() -> None:
        head_scores(open_store(path)).compute()
        attention_stats(open_store(path)).compute()

    t_scores = C.timeit(lambda: head_scores(open_store(path)).compute(), repeat=repeat)
    t_census = C.timeit(census, repeat=repeat)
    ours = head_scores(ds).compute()

    bridge = load_model(args.model, "cpu").bridge
    model = TokensIn(bridge)
    seqs = [torch.as_tensor(row[None], dtype=torch.long) for row in toks]
    n = toks.shape[1]

    def live_documented() -> dict[str, np.ndarray]:
        out = {}
        with torch.no_grad():
            for kind in KINDS:
                out[kind] = np.stack([detect_head(model, s, detection(kind, n)).numpy() for s in seqs], -1)
        return out

    def live_cached() -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
        with torch.no_grad():
            for s in seqs:
                _, cache = bridge.run_with_cache(s, remove_batch_dim=True)
                for kind in KINDS:
                    out[kind].append(detect_head(model, s, detection(kind, n), cache=cache).numpy())
        return {k: np.stack(v, -1) for k, v in out.items()}

    t_live = C.timeit(live_documented, repeat=1, warmup=0)
    t0 = time.perf_counter()
    want = live_cached()
    t_cached = time.perf_counter() - t0
    err = max(
        float(np.abs(ours[f"{k}_per_sequence"].transpose("layer", "head", "batch").values - want[k]).max())
        for k in KINDS
    )
    t_plain = C.timeit(lambda: C.plain_forward(bridge, toks, n_seq), repeat=repeat)
    ind = ours["induction"].stack(lh=("layer", "head"))
    best = int(np.argmax(ind.values))
    top = f"{int(ind['layer'].values[best])}.{int(ind['head'].values[best])}"

    rows = [
        ["plain forward pass (logits only)", t_plain, t_plain / t_census],
        [f"detect_head as documented: {len(KINDS)} kinds x {n_seq} sequences, one forward each", t_live,
         t_live / t_census],
        [f"detect_head sharing one run_with_cache per sequence ({n_seq} forwards)", t_cached, t_cached / t_census],
        [f"store: head_scores, {len(KINDS)} kinds, all {n_layers * n_heads} heads", t_scores, t_scores / t_census],
        [f"store: head_scores + attention_stats, all {n_layers * n_heads} heads", t_census, 1.0],
    ]  # fmt: skip
    header = ["method", "seconds", "x store census"]
    print(C.table(header, rows))
    print(f"store census vs detect_head: {t_live / t_census:.1f}x (documented), {t_cached / t_census:.1f}x (cached)")
    print(f"max |store - detect_head| over every kind, head and sequence: {err:.1e}; top induction head {top}")
    cmd = "python bench/census.py" + (" --quick" if args.quick else "")
    body = f"""## (d) Head census from the store vs `detect_head` on the live model

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}` ({n_layers} layers x {n_heads} heads = {n_layers * n_heads} heads), data `repeated-random`,
{n_seq} sequences x {n} tokens, store fields `tokens,pattern` (float32). Store rows: median of {repeat} run(s);
`detect_head` rows: one run each (it is handed the store's token tensor: random tokens do not survive
decode -> encode; `bench/census.py` says how).

{C.table(header, rows)}

- Every head's five scores (previous-token, duplicate-token, induction, BOS, self) plus the attention
  statistics from the store: **{t_live / t_census:.1f}x faster** than `detect_head` run per kind and sequence
  as documented, {t_cached / t_census:.1f}x faster than its cheapest use (one cached forward pass per sequence
  shared by the five kinds). Same numbers: max |difference| {err:.1e} over every kind, head and sequence.
- The store's one-time extraction (a forward pass per batch, section (b)) is not in these rows.
- Top induction head on this data: {top} ({float(ind.values[best]):.3f}; ceiling `n / (2n + 1)` = {(n - 1) // 2 / n:.3f}).
"""
    C.write_section("census", body)


if __name__ == "__main__":
    main()
