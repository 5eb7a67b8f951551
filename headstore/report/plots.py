"""Figure helpers: a static PNG (matplotlib's object API, no global backend) and an interactive HTML (plotly)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

TITLE_CHAR_PX = 9.5  # mean glyph width of plotly's default 17 px title font
DEFAULT_WIDTH = 700  # plotly's width when a figure sets none


def fit_title(fig: go.Figure) -> go.Figure:
    """Wrap a title wider than its figure onto lines (plotly clips it otherwise), growing the top margin."""
    text = fig.layout.title.text
    if not text:
        return fig
    chars = max(30, int(((fig.layout.width or DEFAULT_WIDTH) - 80) / TITLE_CHAR_PX))
    lines = [w for line in text.split("<br>") for w in textwrap.wrap(line, chars) or [""]]
    if len(lines) > len(text.split("<br>")):
        fig.update_layout(title_text="<br>".join(lines), margin_t=60 + 24 * len(lines))
    return fig


def save_html(fig: go.Figure, path: Path) -> Path:
    """Self-contained HTML (plotly.js inlined: opens offline); titles wider than the figure wrap."""
    fit_title(fig).write_html(path, include_plotlyjs=True, full_html=True)
    return path


def layer_head_heatmaps(
    panels: Sequence[xr.DataArray],
    titles: Sequence[str],
    title: str,
    stem: Path,
    symmetric: bool = True,
    *,
    limits: tuple[float, float] | None = None,
    cmap: str = "RdBu",
) -> list[Path]:
    """One (layer, head) heatmap per panel, side by side, as ``stem.png`` and ``stem.html``.

    One colour scale for all panels: ``limits`` when given, else symmetric about 0 or min..max."""
    mats = [p.transpose("layer", "head").values.astype(float) for p in panels]
    layers = panels[0]["layer"].values if "layer" in panels[0].coords else np.arange(mats[0].shape[0])
    vmax = max(float(np.nanmax(np.abs(m))) for m in mats) or 1.0
    vmin = -vmax if symmetric else min(float(np.nanmin(m)) for m in mats)
    if limits is not None:
        vmin, vmax = limits
    fig = Figure(figsize=(4.5 * len(mats) + 1, 4.5))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, m, t in zip(axes[0], mats, titles, strict=True):
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig = make_subplots(rows=1, cols=len(mats), subplot_titles=list(titles))
    for i, m in enumerate(mats):
        pfig.add_trace(
            go.Heatmap(
                z=m, y=[str(x) for x in layers], colorscale=cmap, zmin=vmin, zmax=vmax,
                showscale=i == 0, texttemplate="%{z:.2f}" if m.size <= 400 else None,
            ),
            row=1, col=i + 1,
        )  # fmt: skip
        pfig.update_xaxes(title_text="head", row=1, col=i + 1)
        pfig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=i + 1)
    pfig.update_layout(title=title, height=550, width=450 * len(mats) + 100)
    return [png, save_html(pfig, stem.with_suffix(".html"))]


def head_table(score: xr.DataArray, name: str, ascending: bool = True) -> pd.DataFrame:
    """(layer, head) scores -> rows ``layer, head, name`` sorted (most extreme first)."""
    s = score.transpose("layer", "head")
    rows = [
        {"layer": int(L), "head": int(h), name: float(s.sel(layer=L).isel(head=h))}
        for L in s["layer"].values
        for h in range(s.sizes["head"])
    ]
    return pd.DataFrame(rows).sort_values(name, ascending=ascending, kind="stable").reset_index(drop=True)


def matrix_heatmaps(
    mats: Sequence[np.ndarray], labels: Sequence[str], titles: Sequence[str], title: str, stem: Path,
    xlabel: str, ylabel: str,
) -> list[Path]:  # fmt: skip
    """One square (row, column) heatmap per matrix, side by side, rows and columns named by ``labels``
    (e.g. ``"L.h"``), NaN left blank, as ``stem.png`` and ``stem.html``; one colour scale for all."""
    finite = [m[np.isfinite(m)] for m in mats]
    vmin = min((float(f.min()) for f in finite if f.size), default=0.0)
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0)
    n = len(labels)
    step = max(1, n // 40)  # at most ~40 tick labels per axis
    fig = Figure(figsize=(5.5 * len(mats) + 1, 5.5))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, m, t in zip(axes[0], mats, titles, strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=5)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=5)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig = make_subplots(rows=1, cols=len(mats), subplot_titles=list(titles))
    for i, m in enumerate(mats):
        z = [[None if not np.isfinite(v) else float(v) for v in row] for row in m]
        pfig.add_trace(
            go.Heatmap(z=z, x=list(labels), y=list(labels), colorscale="Viridis", zmin=vmin, zmax=vmax,
                       showscale=i == 0),
            row=1, col=i + 1,
        )  # fmt: skip
        pfig.update_xaxes(title_text=xlabel, type="category", row=1, col=i + 1)
        pfig.update_yaxes(title_text=ylabel, type="category", autorange="reversed", row=1, col=i + 1)
    pfig.update_layout(title=title, height=650, width=600 * len(mats) + 100)
    return [png, save_html(pfig, stem.with_suffix(".html"))]
