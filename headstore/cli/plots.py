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
    panels: Sequence[xr.DataArray], titles: Sequence[str], title: str, stem: Path, symmetric: bool = True
) -> list[Path]:
    """One (layer, head) heatmap per panel, side by side, as ``stem.png`` and ``stem.html``."""
    mats = [p.transpose("layer", "head").values.astype(float) for p in panels]
    layers = panels[0]["layer"].values if "layer" in panels[0].coords else np.arange(mats[0].shape[0])
    vmax = max(float(np.nanmax(np.abs(m))) for m in mats) or 1.0
    vmin = -vmax if symmetric else min(float(np.nanmin(m)) for m in mats)
    fig = Figure(figsize=(4.5 * len(mats) + 1, 4.5))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, m, t in zip(axes[0], mats, titles, strict=True):
        im = ax.imshow(m, cmap="RdBu", vmin=vmin, vmax=vmax, aspect="auto")
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
                z=m, y=[str(x) for x in layers], colorscale="RdBu", zmin=vmin, zmax=vmax,
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
