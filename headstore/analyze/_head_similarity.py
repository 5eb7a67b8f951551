"""``head_similarity``: every pair of heads compared by how they attend on the store's data, with an ordering
and a clustering that put near-duplicate heads and families of heads side by side.

Each head is the vector of its attention weights over the store's (b, q, k) entries with ``1 <= q < length[b]``
and ``k <= q`` (the causal entries of real tokens; query 0 left out: it can only attend to itself, weight 1 in
every head). The similarity of two heads is the Pearson correlation of these vectors::

    n        = number of entries
    S[i]     = sum_e x_i[e],   G[i, j] = sum_e x_i[e] x_j[e]
    cov[i,j] = G[i, j] / n - S[i] S[j] / n^2
    similarity[layer_a, head_a, layer_b, head_b] = cov[a, b] / sqrt(cov[a, a] cov[b, b])

``S`` and ``G`` are sums over sequences, accumulated one batch chunk at a time (all layers of a chunk at
once: every pair of heads), so memory holds a few chunks' patterns and a heads x heads matrix, whatever the
number of tokens. A head whose pattern was not stored, or that is constant, has NaN similarity.

``order`` is the leaf order of an average-linkage clustering on ``1 - similarity`` (scipy), so similar
heads are adjacent; ``cluster[layer, head]`` cuts that tree at distance ``1 - threshold`` (heads in one
cluster are, on average, correlated above ``threshold``); -1 for NaN heads.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze._blocks import batch_slices, stream
from headstore.analyze._maths import require, sequence_lengths
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.store_schema import HeadstoreError

REQUIRES = ("tokens", "pattern")


def _block(start: int, pattern: np.ndarray, length: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """One batch chunk, every layer: (entries, S (heads,), G (heads, heads)) with heads = layer x head."""
    n_b, n_l, n_h = pattern.shape[:3]
    n, s, g = 0, np.zeros(n_l * n_h), np.zeros((n_l * n_h, n_l * n_h))
    for b in range(n_b):
        rows, cols = np.tril_indices(int(length[b]))
        keep = rows >= 1
        x = pattern[b][:, :, rows[keep], cols[keep]].reshape(n_l * n_h, -1).astype(np.float64)
        n += x.shape[1]
        s += x.sum(1)
        g += x @ x.T
    return n, s, g


def _clusters(sim: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(heads, heads) similarity -> (leaf order over all heads, NaN heads last; cluster ids, -1 for NaN)."""
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    ok = np.flatnonzero(np.isfinite(np.diag(sim)))
    cluster = np.full(sim.shape[0], -1, np.int64)
    if ok.size < 2:
        cluster[ok] = 1
        return np.concatenate([ok, np.setdiff1d(np.arange(sim.shape[0]), ok)]), cluster
    dist = np.clip(1.0 - sim[np.ix_(ok, ok)], 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    cluster[ok] = fcluster(tree, t=1.0 - threshold, criterion="distance")
    order = ok[leaves_list(tree)]
    return np.concatenate([order, np.setdiff1d(np.arange(sim.shape[0]), ok)]), cluster


def head_similarity(ds: xr.Dataset, *, threshold: float = 0.5) -> xr.Dataset:
    """The correlation of every pair of heads' attention weights over the store, an ordering and clusters.

    ``similarity[layer_a, head_a, layer_b, head_b] = corr_e(pattern[b, layer_a, head_a, q, k], pattern[b, layer_b,
    head_b, q, k])`` over the entries ``e = (b, q, k)`` with ``k <= q``, ``1 <= q < length[b]``; ``order_layer``,
    ``order_head`` (dim ``order``) list the heads in the leaf order of an average-linkage clustering on
    ``1 - similarity``; ``cluster[layer, head]`` the clusters at distance ``1 - threshold``. Computed on call,
    one batch chunk (all layers) at a time.
    """
    require(ds, REQUIRES, "head-similarity")
    if not -1.0 <= float(threshold) <= 1.0:
        raise HeadstoreError(f"threshold is a correlation in [-1, 1], got {threshold!r}")
    n_l, n_h = ds.sizes["layer"], ds.sizes["head"]
    arrays = {"pattern": ds["pattern"], "length": sequence_lengths(ds)}
    n, s, g = 0, 0.0, 0.0  # sums folded block by block, in the store's order
    for *_, (n_b, s_b, g_b) in stream(_block, arrays, batch_slices(ds), [list(range(n_l))]):
        n, s, g = n + n_b, s + s_b, g + g_b
    if n < 2:
        raise HeadstoreError("head-similarity needs sequences of at least 2 real tokens: this store has none")
    cov = g / n - np.outer(s, s) / n**2
    d = np.sqrt(np.where(np.diag(cov) > 0, np.diag(cov), np.nan))
    sim = cov / np.outer(d, d)
    order, cluster = _clusters(sim, float(threshold))
    layers = np.array(ds.hs.layers)
    out = xr.Dataset(
        {
            "similarity": (("layer_a", "head_a", "layer_b", "head_b"), sim.reshape(n_l, n_h, n_l, n_h)),
            "order_layer": ("order", layers[order // n_h]),
            "order_head": ("order", order % n_h),
            "cluster": (("layer", "head"), cluster.reshape(n_l, n_h)),
        },
        coords={"layer_a": layers, "head_a": np.arange(n_h), "layer_b": layers, "head_b": np.arange(n_h),
                "layer": layers, "head": np.arange(n_h)},
    )  # fmt: skip
    out.attrs.update({"analyzer": "head-similarity", "threshold": float(threshold), "n_entries": int(n)})
    return out


SPEC = AnalyzerSpec(
    "head-similarity", head_similarity, REQUIRES,
    doc="Correlation of every pair of heads' attention over the store, clustering order and families",
    params={"threshold": float},
)  # fmt: skip
register_analyzer(SPEC)
