"""Attention statistics of every head: how spread out, how far back, how peaked.

Per sequence ``b`` with ``n`` real tokens (its ``length`` column, else ``pos``), query ``q`` and
``A = pattern[b, L, h, q, :]`` (zero beyond ``q``, causal)::

    entropy[q]  = -sum_k A[k] log A[k]     (nats, over the keys it can attend to; 0 log 0 = 0)
    distance[q] =  sum_k A[k] (q - k)      (mean attended distance, in tokens)
    top1[q]     =  max_k A[k]              (fraction of the mass on the top-1 key)

each averaged over the queries ``1 <= q < n`` (position 0 has one key to attend to: BOS, so nothing to
measure) into ``X_per_sequence[layer, head, batch]``, then ``X[layer, head]`` = mean over sequences
and ``X_std`` = their standard deviation across sequences (``ddof = 0``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze._apply import apply_blocks, store_blocks
from headstore.analyze._maths import lead_axes, require, sequence_lengths
from headstore.analyze.registry import AnalyzerSpec, register_analyzer

REQUIRES = ("tokens", "pattern")
STATS = ("entropy", "distance", "top1")


def _block(length: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """One (batch chunk, layer) block: (batch, layer, head, stat), ``stat`` in STATS order.

    ``length`` (b,), ``pattern`` (b, l, head, q, k); float64 per sequence."""
    length, pattern = lead_axes(length, 0)[:, 0], lead_axes(pattern, 3)
    n_b, n_l, n_h = pattern.shape[:3]
    out = np.full((n_b, n_l, n_h, len(STATS)), np.nan)
    for i in range(n_b):
        n = int(length[i])
        if n < 2:
            continue
        a = pattern[i, :, :, 1:n, :n].astype(np.float64)  # (l, h, q = 1..n-1, k)
        ent = -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1)
        back = np.arange(1, n)[:, None] - np.arange(n)[None, :]  # q - k
        dist = (a * back).sum(-1)
        out[i] = np.stack([ent.mean(-1), dist.mean(-1), a.max(-1).mean(-1)], axis=-1)
    return out


def attention_stats(ds: xr.Dataset) -> xr.Dataset:
    """Per head: mean attention entropy (nats), mean attended distance and top-1 key mass.

    ``entropy_per_sequence[layer, head, batch] = mean_{1 <= q < n} -sum_k A log A``,
    ``distance_... = mean_q sum_k A (q - k)``, ``top1_... = mean_q max_k A`` with ``A = pattern[batch,
    layer, head, q, :]`` and ``n`` the sequence's real tokens; ``X[layer, head]`` = mean over batch,
    ``X_std`` = std over batch. Lazy; one task per (batch chunk, stored layer block).
    """
    require(ds, REQUIRES, "attention-stats")
    block = store_blocks(ds, "pattern")  # the store's batch chunk x its stored layer block (a shard), whole elsewhere
    stats = apply_blocks(
        _block,
        block(sequence_lengths(ds)),
        block(ds["pattern"]),
        input_core_dims=[[], ["head", "query_pos", "key_pos"]],
        output_core_dims=[["head", "stat"]],
        output_dtypes=[np.float64],
        output_sizes={"stat": len(STATS)},
    )
    out = xr.Dataset()
    for i, name in enumerate(STATS):
        per_sequence = stats.isel(stat=i).transpose("layer", "head", "batch")
        out[name] = per_sequence.mean("batch", skipna=False)
        out[f"{name}_std"] = per_sequence.std("batch", skipna=False)
        out[f"{name}_per_sequence"] = per_sequence
    out.attrs["analyzer"] = "attention-stats"
    return out


SPEC = AnalyzerSpec(
    "attention-stats", attention_stats, REQUIRES,
    doc="Per head: mean attention entropy, attended distance and top-1 key mass, with their spread across sequences",
)  # fmt: skip
register_analyzer(SPEC)
