"""Tables and figures of the example analyzers (issue 28) for the CLI and the report: ``NAME_summary(result) ->
DataFrame`` (``summary.csv``, one row per head) and ``NAME_plot(result, folder) -> [paths]`` (PNG + HTML), as in
``headstore.report.figures``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from headstore.report.plots import layer_head_heatmaps, matrix_heatmaps


def _heads(res: xr.Dataset) -> list[tuple[int, int, int]]:
    """(layer index, layer, head) of every head of a result."""
    return [(i, int(L), h) for i, L in enumerate(res["layer"].values) for h in range(res.sizes["head"])]


def _s(x: object) -> str:
    return str(x)


# top-attention
def top_attention_summary(res: xr.Dataset) -> pd.DataFrame:
    """Per head: its largest weight and where (sequence, query -> key, tokens), the mean of its top k; largest first."""
    rows = []
    for i, L, h in _heads(res):
        ex = res.isel(layer=i, head=h)
        w = ex["weight"].values.astype(float)
        if not np.isfinite(w[0]):
            continue
        rows.append(
            {
                "layer": L, "head": h, "top_weight": w[0], "mean_top_k": float(np.nanmean(w)),
                "sequence": int(ex["sequence"].values[0]), "query_pos": int(ex["query_pos"].values[0]),
                "key_pos": int(ex["key_pos"].values[0]), "query_str": _s(ex["query_str"].values[0]),
                "key_str": _s(ex["key_str"].values[0]),
            }
        )  # fmt: skip
    table = pd.DataFrame(rows, columns=["layer", "head", "top_weight", "mean_top_k", "sequence", "query_pos",
                                        "key_pos", "query_str", "key_str"])  # fmt: skip
    return table.sort_values("top_weight", ascending=False, kind="stable").reset_index(drop=True)


def top_attention_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    w = res["weight"]
    return layer_head_heatmaps(
        [w.isel(rank=0), w.mean("rank")], ["largest weight", f"mean of the top {w.sizes['rank']}"],
        "Top attention weights over the store", folder / "top_attention", symmetric=False, limits=(0.0, 1.0),
        cmap="Blues",
    )  # fmt: skip


# top-effects
def top_effects_summary(res: xr.Dataset) -> pd.DataFrame:
    """Per head: its largest and most negative direct effect and where; the widest range first."""
    rows = []
    for i, L, h in _heads(res):
        ex = res.isel(layer=i, head=h, rank=0)
        hi, lo = float(ex["effect"].values[0]), float(ex["effect"].values[1])
        if not (np.isfinite(hi) and np.isfinite(lo)):
            continue
        rows.append(
            {
                "layer": L, "head": h, "largest": hi, "most_negative": lo, "range": hi - lo,
                "largest_at": f"{int(ex['sequence'].values[0])}:{int(ex['pos'].values[0])}",
                "largest_token": _s(ex["token_str"].values[0]),
                "most_negative_at": f"{int(ex['sequence'].values[1])}:{int(ex['pos'].values[1])}",
                "most_negative_token": _s(ex["token_str"].values[1]),
            }
        )  # fmt: skip
    cols = ["layer", "head", "largest", "most_negative", "range", "largest_at", "largest_token", "most_negative_at",
            "most_negative_token"]  # fmt: skip
    table = pd.DataFrame(rows, columns=cols)
    return table.sort_values("range", ascending=False, kind="stable").reset_index(drop=True)


def top_effects_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    e = res["effect"].isel(rank=0)
    by = res.attrs.get("by", "next")
    return layer_head_heatmaps(
        [e.sel(order="largest"), e.sel(order="most_negative")], ["largest", "most negative"],
        f"Direct effects on the logit of the {'next' if by == 'next' else 'attended'} token (top-1 per head)",
        folder / "top_effects",
    )  # fmt: skip


# attention-search
def attention_search_summary(res: xr.Dataset) -> pd.DataFrame:
    """Per head: mean mass and rank, best first; the counts of matching queries and pairs on every row."""
    mass, rank = res["mass"].transpose("layer", "head"), res["rank"].transpose("layer", "head")
    rows = [
        {"layer": L, "head": h, "mass": float(mass.values[i, h]), "rank": int(rank.values[i, h])}
        for i, L, h in _heads(res)
    ]
    table = pd.DataFrame(rows, columns=["layer", "head", "mass", "rank"])
    table["n_queries"], table["n_pairs"] = int(res["n_queries"]), int(res["n_pairs"])
    table = table[table["rank"] >= 0]
    return table.sort_values("rank", kind="stable").reset_index(drop=True)


def attention_search_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    a = res.attrs
    title = f"Attention from {a.get('query')} to {a.get('key')} ({int(res['n_queries'])} queries, mean mass)"
    return layer_head_heatmaps(
        [res["mass"]], ["mean mass"], title, folder / "attention_search", symmetric=False, limits=(0.0, 1.0),
        cmap="Blues",
    )  # fmt: skip


# head-similarity
def head_similarity_summary(res: xr.Dataset) -> pd.DataFrame:
    """Per head: its cluster and its most similar other head (-1: none); in the clustering's order."""
    sim = res["similarity"].transpose("layer_a", "head_a", "layer_b", "head_b").values
    n_l, n_h = sim.shape[:2]
    flat = sim.reshape(n_l * n_h, n_l * n_h).copy()
    np.fill_diagonal(flat, np.nan)
    layers = res["layer_a"].values
    rows = []
    for L, h in zip(res["order_layer"].values, res["order_head"].values):
        i = int(np.flatnonzero(layers == L)[0]) * n_h + int(h)
        row = flat[i]
        j = int(np.nanargmax(row)) if np.isfinite(row).any() else -1
        rows.append(
            {
                "layer": int(L), "head": int(h), "cluster": int(res["cluster"].sel(layer=L, head=h)),
                "nearest_layer": int(layers[j // n_h]) if j >= 0 else -1, "nearest_head": j % n_h if j >= 0 else -1,
                "similarity": float(row[j]) if j >= 0 else float("nan"),
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["layer", "head", "cluster", "nearest_layer", "nearest_head", "similarity"])


def head_similarity_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    sim = res["similarity"].transpose("layer_a", "head_a", "layer_b", "head_b")
    n_l, n_h = sim.shape[:2]
    layers = list(res["layer_a"].values)
    order = [layers.index(L) * n_h + int(h) for L, h in zip(res["order_layer"].values, res["order_head"].values)]
    mat = sim.values.reshape(n_l * n_h, n_l * n_h)[np.ix_(order, order)].astype(float)
    labels = [f"{int(L)}.{int(h)}" for L, h in zip(res["order_layer"].values, res["order_head"].values)]
    return matrix_heatmaps(
        [mat], labels, ["pattern correlation"], "Head similarity, heads in clustering order", folder / "head_similarity",
        xlabel="head (layer.head)", ylabel="head (layer.head)",
    )  # fmt: skip
