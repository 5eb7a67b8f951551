"""Per-analyzer tables and figures of the weights and attention analyzers (circuits, if/else, head scores,
attention statistics, composition): see ``headstore.report.figures`` for the conventions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from headstore.report.plots import head_table, layer_head_heatmaps, matrix_heatmaps, save_html


# circuits
def circuits_summary(res: xr.Dataset) -> pd.DataFrame:
    table = head_table(res["ov_percentile"], "ov_percentile", ascending=False)
    for name in ("ov_rev", "qk", "qk_rev"):
        other = head_table(res[f"{name}_percentile"], f"{name}_percentile")
        table = table.merge(other, on=["layer", "head"])
    for name in ("ov", "ov_rev", "qk", "qk_rev"):
        ranks = head_table(res[f"{name}_rank"], f"{name}_rank")
        table = table.merge(ranks, on=["layer", "head"])
    return table


def circuits_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    a = res.attrs
    titles = [
        f"OV: {a.get('src_token', 'src')!r} among sources of {a.get('out_token', 'out')!r}",
        f"OV reverse: {a.get('out_token', 'out')!r} among outputs of {a.get('src_token', 'src')!r}",
        f"QK: {a.get('key_token', 'key')!r} among keys of {a.get('query_token', 'query')!r}",
        f"QK reverse: {a.get('query_token', 'query')!r} among queries of {a.get('key_token', 'key')!r}",
    ]
    panels = [res[f"{n}_percentile"] for n in ("ov", "ov_rev", "qk", "qk_rev")]
    return layer_head_heatmaps(
        panels, titles, "circuit percentiles (1 = top of the vocabulary)", folder / "circuits", symmetric=False
    )


# ifelse-detector
def ifelse_summary(res: xr.Dataset) -> pd.DataFrame:
    """Per head: AUROC of that head's total attribution alone, and its mean on each test split."""
    table = head_table(res["head_auroc"], "head_auroc", ascending=False)
    test = res["subset"] == "test"
    for name in ("trusted", "anomalous"):
        mean = res["head_feature"].where(test & (res["split"] == name)).mean("batch")
        table = table.merge(head_table(mean, f"mean_attr_{name}_test"), on=["layer", "head"])
    return table


def ifelse_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    """Score histograms per split (trusted train / trusted test / anomalous test) for each detector."""
    dets = [str(d) for d in res["detector"].values]
    # read back from result.zarr these are numpy StringDType, which .astype(str) refuses
    split = np.array(res["split"].values.tolist(), dtype=str)
    subset = np.array(res["subset"].values.tolist(), dtype=str)
    groups = {
        "trusted train": (split == "trusted") & (subset == "train"),
        "trusted test": (split == "trusted") & (subset == "test"),
        "anomalous test": (split == "anomalous") & (subset == "test"),
    }
    fig = Figure(figsize=(4.5 * len(dets), 3.8))
    axes = fig.subplots(1, len(dets), squeeze=False)
    pfig = make_subplots(rows=1, cols=len(dets), subplot_titles=[
        f"{d} (AUROC {float(res['auroc'].sel(detector=d)):.3f})" for d in dets
    ])  # fmt: skip
    for i, d in enumerate(dets):
        s = np.log10(np.maximum(res["score"].sel(detector=d).values.astype(float), 1e-12))
        bins = np.histogram_bin_edges(s[np.isfinite(s)], bins=30)
        ax = axes[0][i]
        for j, (name, mask) in enumerate(groups.items()):
            ax.hist(s[mask], bins=bins, alpha=0.5, label=name)
            pfig.add_trace(
                go.Histogram(x=s[mask], name=name, opacity=0.5, legendgroup=name, showlegend=i == 0,
                             marker_color=["#1f77b4", "#2ca02c", "#d62728"][j]),
                row=1, col=i + 1,
            )  # fmt: skip
        ax.set_title(f"{d} (AUROC {float(res['auroc'].sel(detector=d)):.3f})", fontsize=9)
        ax.set_xlabel("log10 Mahalanobis^2")
        ax.legend(fontsize=7)
    title = f"if/else anomaly scores (effect token {res.attrs.get('effect_token', '')!r})"
    fig.suptitle(title, fontsize=10)
    png = folder / "ifelse_detector.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig.update_layout(title=title, barmode="overlay", height=450, width=450 * len(dets) + 100)
    return [png, save_html(pfig, folder / "ifelse_detector.html")]


# head-scores
def _score_names(res: xr.Dataset) -> list[str]:
    """The kinds / statistics of a result: the variables that have a ``NAME_per_sequence`` beside them."""
    return [str(v) for v in res.data_vars if f"{v}_per_sequence" in res.data_vars]


def _merged(res: xr.Dataset, names: list[str], sort_by: str, ascending: bool) -> pd.DataFrame:
    table = head_table(res[sort_by], sort_by, ascending=ascending)
    for name in names:
        if name != sort_by:
            table = table.merge(head_table(res[name], name), on=["layer", "head"])
    return table[["layer", "head", *names]]


def head_scores_summary(res: xr.Dataset) -> pd.DataFrame:
    """Every head's mean score of each kind, sorted by induction (else the first kind), highest first."""
    kinds = _score_names(res)
    return _merged(res, kinds, "induction" if "induction" in kinds else kinds[0], ascending=False)


def head_scores_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    kinds = _score_names(res)
    a = res.attrs
    opts = [o for o in ("exclude_bos", "exclude_current_token") if a.get(o)]
    title = f"detect_head scores ({a.get('error_measure', 'mul')}{', ' + ', '.join(opts) if opts else ''}), mean over sequences"
    limits = (0.0, 1.0) if a.get("error_measure", "mul") == "mul" else (-1.0, 1.0)
    return layer_head_heatmaps(
        [res[k] for k in kinds], [k.replace("_", " ") for k in kinds], title, folder / "head_scores",
        limits=limits, cmap="viridis",
    )  # fmt: skip


# attention-stats
STAT_TITLES = {
    "entropy": "mean attention entropy (nats)",
    "distance": "mean attended distance (tokens)",
    "top1": "mean attention on the top-1 key",
}


def attention_stats_summary(res: xr.Dataset) -> pd.DataFrame:
    """Every head's mean entropy, distance and top-1 mass with their std across sequences, lowest entropy first."""
    names = [n for s in _score_names(res) for n in (s, f"{s}_std")]
    return _merged(res, names, "entropy", ascending=True)


def attention_stats_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    paths: list[Path] = []
    for name in _score_names(res):  # one figure each: the three have different units
        paths += layer_head_heatmaps(
            [res[name]], [STAT_TITLES.get(name, name)], f"Attention statistics: {name}, mean over sequences "
            "(queries after position 0)", folder / f"attention_{name}", symmetric=False, cmap="viridis",
        )  # fmt: skip
    return paths


# composition
def _composition_kinds(res: xr.Dataset) -> list[str]:
    return [str(k) for k in res["kind"].values]


def composition_summary(res: xr.Dataset) -> pd.DataFrame:
    """One row per head pair (layer_a < layer_b): each kind's score and its z-score against the Gaussian
    baseline, ``(score - baseline_mean) / baseline_std``; sorted by the first kind, highest first."""
    kinds = _composition_kinds(res)
    first = res[kinds[0]].transpose("layer_a", "head_a", "layer_b", "head_b")
    la, ha, lb, hb = np.nonzero(np.isfinite(first.values))
    table = pd.DataFrame(
        {
            "layer_a": res["layer_a"].values[la], "head_a": ha, "layer_b": res["layer_b"].values[lb], "head_b": hb,
        }
    )  # fmt: skip
    for k in kinds:
        m = res[k].transpose("layer_a", "head_a", "layer_b", "head_b").values[la, ha, lb, hb]
        table[k] = m
        mean, std = float(res["baseline_mean"].sel(kind=k)), float(res["baseline_std"].sel(kind=k))
        table[f"{k}_z"] = (m - mean) / std
    return table.sort_values(kinds[0], ascending=False, kind="stable").reset_index(drop=True)


def composition_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    kinds = _composition_kinds(res)
    mats, labels = [], []
    for k in kinds:
        s = res[k].transpose("layer_a", "head_a", "layer_b", "head_b")
        n_l, n_h = s.shape[:2]
        mats.append(s.values.reshape(n_l * n_h, n_l * n_h).astype(float))
        labels = [f"{int(L)}.{h}" for L in s["layer_a"].values for h in range(n_h)]
    titles = [
        f"{k}-composition (baseline {float(res['baseline_mean'].sel(kind=k)):.3f} ± "
        f"{float(res['baseline_std'].sel(kind=k)):.3f})"
        for k in kinds
    ]
    return matrix_heatmaps(
        mats, labels, titles, "Composition scores: earlier head (row) into later head (column)",
        folder / "composition", xlabel="later head (layer.head)", ylabel="earlier head (layer.head)",
    )  # fmt: skip
