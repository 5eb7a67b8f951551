"""attention-attribution's table and figure for the CLI, the report and the main job.

The table lists the top (query component, key component) pairs; the figure is the mean term matrix as a heatmap
(the copy-suppression paper's query/key figure for 10.7) beside a bar chart of the top pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from headstore.report.plots import save_html

MAX_SHOWN = 40  # components per axis of the heatmap: beyond that, those with the largest summed |mean term|


def attention_attribution_summary(res: xr.Dataset) -> pd.DataFrame:
    """One row per top pair: the head, its rank, the two components, the mean term over sequences and its share
    of the mean score."""
    a = res.attrs
    mean_score = float(np.asarray(res["score"].values, dtype=float).mean())
    rows = [
        {
            "layer": int(a["layer"]), "head": int(a["head_index"]), "rank": i + 1,
            "q_component": str(q), "k_component": str(k), "mean_term": float(t),
            "share_of_score": float(t) / mean_score if mean_score else float("nan"), "mean_score": mean_score,
        }
        for i, (q, k, t) in enumerate(
            zip(res["top_q_component"].values, res["top_k_component"].values, res["top_term"].values, strict=True)
        )
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _largest(m: np.ndarray, names: list[str], axis: int) -> tuple[np.ndarray, list[str], str]:
    """Keep the ``MAX_SHOWN`` components (rows for ``axis`` 1, columns for 0) of largest summed ``|m|``, in
    residual order; the axis label says how many of how many."""
    if len(names) <= MAX_SHOWN:
        return m, names, ""
    keep = np.sort(np.argsort(-np.abs(m).sum(axis), kind="stable")[:MAX_SHOWN])
    return np.take(m, keep, axis=1 - axis), [names[i] for i in keep], f" ({MAX_SHOWN} of {len(names)}, largest |term|)"


def _title(res: xr.Dataset) -> str:
    a = res.attrs
    kind = "" if a.get("scores", "model") == "model" else " (pre-soft-cap)"
    return (
        f"Why head {a.get('head', '')} attends: query x key terms of its score{kind}, "
        f"query {a.get('query_pos', '')}, key {a.get('key_pos', '')}, mean over {res.sizes['batch']} sequences"
    )


def attention_attribution_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    """Heatmap of ``mean_terms`` (q_component rows, k_component columns, symmetric colour scale) and the top pairs."""
    m = res["mean_terms"].transpose("q_component", "k_component").values.astype(float)
    m, q_names, q_note = _largest(m, [str(x) for x in res["q_component"].values], 1)
    m, k_names, k_note = _largest(m, [str(x) for x in res["k_component"].values], 0)
    pairs = [f"{q} x {k}" for q, k in zip(res["top_q_component"].values, res["top_k_component"].values, strict=True)]
    top = res["top_term"].values.astype(float)
    vmax = float(np.nanmax(np.abs(m))) or 1.0
    title = _title(res)
    fig = Figure(figsize=(13, 6))
    ax, bar = fig.subplots(1, 2, width_ratios=[3, 2])
    im = ax.imshow(m, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(k_names)), k_names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(q_names)), q_names, fontsize=6)
    ax.set_xlabel(f"key-side component{k_note}")
    ax.set_ylabel(f"query-side component{q_note}")
    fig.colorbar(im, ax=ax, shrink=0.8)
    bar.barh(range(len(top)), top, color=["#2166ac" if t > 0 else "#b2182b" for t in top])  # RdBu
    bar.set_yticks(range(len(top)), pairs, fontsize=7)
    bar.invert_yaxis()
    bar.axvline(0.0, color="black", linewidth=1)
    bar.set_xlabel("mean term (query x key)")
    fig.suptitle(title, fontsize=9)
    png = folder / "attention_attribution.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=["mean term", "top pairs"])
    pfig.add_trace(
        go.Heatmap(z=m, x=k_names, y=q_names, colorscale="RdBu", zmid=0, zmin=-vmax, zmax=vmax), row=1, col=1
    )
    pfig.add_trace(go.Bar(x=top, y=pairs, orientation="h", showlegend=False), row=1, col=2)
    pfig.update_xaxes(title_text=f"key-side component{k_note}", type="category", row=1, col=1)
    pfig.update_yaxes(title_text=f"query-side component{q_note}", type="category", autorange="reversed", row=1, col=1)
    pfig.update_yaxes(autorange="reversed", row=1, col=2)
    pfig.update_layout(title=title, height=650, width=1300, template="simple_white")
    return [png, save_html(pfig, folder / "attention_attribution.html")]
