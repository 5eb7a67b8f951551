"""Per-analyzer tables and figures for the CLI, the report and the main job (not for ``headstore.analyze``); the
weights and attention analyzers' are in ``figures_heads.py``.

``NAME_summary(result) -> DataFrame`` is the per-head table written as ``summary.csv``; ``NAME_plot(result,
folder) -> [paths]`` writes the seed's figure as PNG (matplotlib's object API: no global backend) and HTML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from matplotlib.figure import Figure

from headstore.report.plots import head_table, layer_head_heatmaps, save_html

MODES = ("project", "perpendicular", "ablation")
PROJECTION_TITLES = ("Only keep projection", "Only keep perpendicular component", "Ablate entirely")


# copy-suppression
def copy_suppression_summary(res: xr.Dataset) -> pd.DataFrame:
    return head_table(res["score"], "score", ascending=True)


def copy_suppression_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    score = res["score"]
    return layer_head_heatmaps(
        [score * (score < 0)],
        ["mean over sequences (negative part)"],
        "Source suppression scores",
        folder / "copy_suppression",
    )


# projection-loss
def projection_loss_summary(res: xr.Dataset) -> pd.DataFrame:
    m = res["mean_increase"].transpose("mode", "layer", "head")
    rows = [
        {"layer": int(L), "head": int(h), **{md: float(m.sel(mode=md, layer=L).isel(head=h)) for md in MODES}}
        for L in m["layer"].values
        for h in range(m.sizes["head"])
    ]
    table = pd.DataFrame(rows, columns=["layer", "head", *MODES])
    return table.sort_values("ablation", ascending=False, kind="stable").reset_index(drop=True)


def projection_loss_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    m = res["mean_increase"]
    return layer_head_heatmaps(
        [m.sel(mode=md) for md in MODES],
        list(PROJECTION_TITLES),
        "Change in loss from projecting",
        folder / "projection_loss",
    )


# calibration
def calibration_summary(res: xr.Dataset) -> pd.DataFrame:
    df = head_table(res["overconfidence_change"], "overconfidence_change", ascending=False)
    over = res["head_overconfidence"]
    ratio = res["overconfidence_ratio"]
    df["overconfidence"] = [float(over.sel(layer=L).isel(head=h)) for L, h in zip(df["layer"], df["head"])]
    df["overconfidence_ratio"] = [float(ratio.sel(layer=L).isel(head=h)) for L, h in zip(df["layer"], df["head"])]
    df["baseline"] = float(res["overconfidence"])
    return df.dropna(subset=["overconfidence_change"]).reset_index(drop=True)


def calibration_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    acc = res["accuracy"].values.astype(float)
    sd = np.sqrt(res["variance"].values.astype(float))
    x = res["p_mid"].values
    base = float(res["overconfidence"])
    title = f"Calibration curve (top-{res.attrs.get('top_k')}), overconfidence = {base:.4f}"
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ax.plot(x, acc, color=(0, 100 / 255, 80 / 255))
    ax.fill_between(x, acc - sd, acc + sd, color=(0, 100 / 255, 80 / 255), alpha=0.2, linewidth=0)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (bin middle)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    png = folder / "calibration_curve.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    xs = x.tolist()
    pfig = go.Figure(
        [
            go.Scatter(x=xs, y=acc.tolist(), line={"color": "rgb(0,100,80)"}, mode="lines", name="accuracy"),
            go.Scatter(
                x=xs + xs[::-1], y=(acc + sd).tolist() + (acc - sd).tolist()[::-1], fill="toself",
                fillcolor="rgba(0,100,80,0.2)", line={"color": "rgba(255,255,255,0)"}, hoverinfo="skip",
                showlegend=False,
            ),
        ]
    )  # fmt: skip
    pfig.update_layout(width=800, height=600, showlegend=False, title=title, xaxis_range=[0, 1], yaxis_range=[0, 1])
    html = save_html(pfig, folder / "calibration_curve.html")
    change = res["overconfidence_change"]
    heat = layer_head_heatmaps(
        [change * (change > 0)],
        ["change in overconfidence (positive part)"],
        f"Change in overconfidence from removing direct effect<br>Baseline (no ablation) = {base:.4f}",
        folder / "overconfidence_change",
        symmetric=True,
    )
    return [png, html, *heat]


# logit-attribution
def logit_attribution_summary(res: xr.Dataset) -> pd.DataFrame:
    mean = res["per_head"].mean("batch")
    df = head_table(mean, "mean_contribution", ascending=False)
    absmean = abs(res["per_head"]).mean("batch")
    df["mean_abs_contribution"] = [float(absmean.sel(layer=L).isel(head=h)) for L, h in zip(df["layer"], df["head"])]
    df["mean_logit"] = float(res["logit"].mean())
    df["mean_residual_other"] = float(res["residual_other"].mean())
    return df


def logit_attribution_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    target = res.attrs.get("target", "")
    paths = layer_head_heatmaps(
        [res["per_head"].mean("batch")],
        ["mean direct contribution"],
        f"Direct logit contribution of each head to target {target!r} (mean over sequences)",
        folder / "per_head",
    )
    c0 = res["contrib"].isel(batch=0).stack(lh=("layer", "head")).transpose("lh", "key_pos")
    mat = c0.values.astype(float)
    rows = [f"{int(L)}.{int(h)}" for L, h in zip(c0["layer"].values, c0["head"].values)]
    if "key_token_str" in res:
        cols = [f"{i}:{s!r}" for i, s in enumerate(res["key_token_str"].isel(batch=0).values.tolist())]
    else:
        cols = [str(i) for i in range(mat.shape[1])]
    dest = int(res["dest"].values[0])
    tstr = str(res["target_str"].values[0]) if "target_str" in res else str(int(res["target"].values[0]))
    title = f"Sequence 0: contribution to logit of {tstr!r} at position {dest}, per head and source position"
    vmax = float(np.nanmax(np.abs(mat))) or 1.0
    fig = Figure(figsize=(max(6, 0.35 * len(cols) + 2), max(4, 0.25 * len(rows) + 2)))
    ax = fig.subplots()
    im = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xlabel("source position")
    ax.set_ylabel("layer.head")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    png = folder / "sources_seq0.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig = go.Figure(go.Heatmap(z=mat, x=cols, y=rows, colorscale="RdBu", zmin=-vmax, zmax=vmax))
    pfig.update_layout(
        title=title,
        xaxis_title="source position",
        yaxis_title="layer.head",
        height=min(1600, max(450, 6 * len(rows) + 250)),
    )
    pfig.update_yaxes(autorange="reversed", type="category")  # "L.h" labels are names, not numbers
    pfig.update_xaxes(type="category")
    return [*paths, png, save_html(pfig, folder / "sources_seq0.html")]


# ioi
def ioi_summary(result: xr.Dataset) -> pd.DataFrame:
    """Heads sorted by mean attention END->IO (highest first)."""
    table = head_table(result["attn_io_mean"], "attn_end_io", ascending=False)
    diff = result["attn_diff_mean"].transpose("layer", "head")
    s1 = result["attn_s1_mean"].transpose("layer", "head")
    layers = list(diff["layer"].values)
    rows = [(layers.index(L), int(h)) for L, h in zip(table["layer"], table["head"], strict=True)]
    table["attn_end_s1"] = [float(s1.values[i, h]) for i, h in rows]
    table["attn_diff"] = [float(diff.values[i, h]) for i, h in rows]
    table["logit_diff_mean"] = float(result["logit_diff_mean"])
    return table


def ioi_pair_summary(result: xr.Dataset) -> pd.DataFrame:
    """Heads sorted by mean attention END->IO on the IOI store, with the ABC store beside it."""
    table = head_table(result["attn_io_mean_ioi"], "attn_end_io_ioi", ascending=False)
    layers = list(result["layer"].values)
    rows = [(layers.index(L), int(h)) for L, h in zip(table["layer"], table["head"], strict=True)]
    for name in ("attn_io_mean_abc", "attn_diff_mean_ioi", "attn_diff_mean_abc"):
        m = result[name].transpose("layer", "head").values
        table[name.replace("_mean", "").replace("attn_io", "attn_end_io")] = [float(m[i, h]) for i, h in rows]
    table["logit_diff_ioi"] = float(result["logit_diff_mean_ioi"])
    table["logit_diff_abc"] = float(result["logit_diff_mean_abc"])
    return table


def ioi_plot(result: xr.Dataset, folder: Path) -> list[Path]:
    return layer_head_heatmaps(
        [result["attn_diff_mean"]],
        ["mean pattern[END, IO] - pattern[END, S1]"],
        f"IOI attention END->IO minus END->S1 (mean logit diff {float(result['logit_diff_mean']):.3f})",
        folder / "ioi_attn_diff",
    )


def ioi_pair_plot(result: xr.Dataset, folder: Path) -> list[Path]:
    return layer_head_heatmaps(
        [result["attn_diff_mean_ioi"], result["attn_diff_mean_abc"]],
        [
            f"IOI (mean logit diff {float(result['logit_diff_mean_ioi']):.3f})",
            f"ABC (mean logit diff {float(result['logit_diff_mean_abc']):.3f})",
        ],
        "mean pattern[END, IO] - pattern[END, S1]",
        folder / "ioi_pair_attn_diff",
    )


# path-patch
def path_patch_summary(result: xr.Dataset) -> pd.DataFrame:
    """One row for the receiver head: mean clean vs patched END->IO minus END->S1 attention."""
    change = np.asarray(result["change"].values, dtype=float)
    return pd.DataFrame(
        [
            {
                "layer": int(result.attrs["receiver_layer"]),
                "head": int(result.attrs["receiver_head"]),
                "senders": str(result.attrs["senders"]) or "(none)",
                "clean_mean": float(result["clean"].mean()),
                "patched_mean": float(result["patched"].mean()),
                "change_mean": float(change.mean()),
                "change_std": float(change.std()),
                "frac_decreased": float((change < 0).mean()),
                "n_prompts": int(change.size),
            }
        ]
    )


def path_patch_plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """The seed's figure: overlaid histograms of the attention difference, patched vs clean."""
    patched = np.asarray(result["patched"].values, dtype=float)
    clean = np.asarray(result["clean"].values, dtype=float)
    a = result.attrs
    senders = str(a.get("senders", "")) or "no heads"
    title = f"Difference in attn from END→IO vs. END→S1 of {a.get('receiver', '')} (path-patched vs clean)"
    names = [
        f"Patched ({senders} from {a.get('corrupt_dataset', 'corrupt')})",
        f"Clean ({a.get('clean_dataset', 'clean')})",
    ]
    xlabel = "Attn diff (positive ⇒ more attn paid to IO than S1)"
    lo = float(min(patched.min(), clean.min(), 0.0))
    hi = float(max(patched.max(), clean.max(), 0.0))
    bins = [float(x) for x in np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)]
    fig = Figure(figsize=(8, 6))
    ax = fig.subplots()
    ax.hist(patched, bins=bins, alpha=0.7, label=names[0])
    ax.hist(clean, bins=bins, alpha=0.7, label=names[1])
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(title, fontsize=9)
    ax.legend()
    png = folder / "path_patch_query.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig = go.Figure()
    for values, name in zip((patched, clean), names, strict=True):
        pfig.add_trace(
            go.Histogram(x=values, name=name, opacity=0.7, xbins={"start": lo, "end": hi, "size": (bins[1] - bins[0])})
        )
    pfig.add_vline(x=0.0, line={"color": "black", "width": 3, "dash": "dash"})
    pfig.update_layout(
        barmode="overlay", title=title, xaxis_title=xlabel, yaxis_title="prompts", width=800, height=600,
        template="simple_white",
    )  # fmt: skip
    return [png, save_html(pfig, folder / "path_patch_query.html")]
