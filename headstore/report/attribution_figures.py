"""Tables and figures of ``attribution_patching`` (a (layer, head) heatmap) and ``edge_attribution`` (a circuit
graph of its top edges), for the CLI and the report: ``summary(res) -> DataFrame``, ``plot(res, folder) -> paths``."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from matplotlib.figure import Figure

from headstore.analyze import top_edges
from headstore.report.plots import layer_head_heatmaps, save_html

N_EDGES = 20  # edges drawn in the circuit graph


def attribution_patching_summary(res: xr.Dataset) -> pd.DataFrame:
    """Every head, largest ``|score|`` first (a negative score: patching the head from the corrupt run lowers M)."""
    s = res["score"].transpose("layer", "head")
    rows = [
        {"layer": int(L), "head": int(h), "score": float(s.sel(layer=L).isel(head=h))}
        for L in s["layer"].values
        for h in range(s.sizes["head"])
    ]
    table = pd.DataFrame(rows)
    return table.iloc[np.argsort(-table["score"].abs().to_numpy(), kind="stable")].reset_index(drop=True)


def attribution_patching_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    metric = res.attrs.get("metric", "M")
    return layer_head_heatmaps(
        [res["score"]], [f"mean over sequences of (z' - z) . dM/dz, M = {metric}"],
        "Attribution patching (AtP) per head", folder / "attribution_patching",
    )  # fmt: skip


def edge_attribution_summary(res: xr.Dataset, n: int = 50) -> pd.DataFrame:
    """The ``n`` edges of largest ``|score|``: edge (EAP-IG's name), sender, receiver, score."""
    top = top_edges(res, n)
    return pd.DataFrame(
        {
            "edge": [str(e) for e in top["edge"].values],
            "sender": [str(s) for s in top["sender"].values],
            "receiver": [str(r) for r in top["receiver"].values],
            "score": np.asarray(top["score"].values, dtype=float),
        }
    )


def _place(node: str, n_layers: int, group: int) -> tuple[float, float]:
    """(x, y) of a node in the circuit graph: y the layer (input at the bottom, logits at the top; an MLP half a
    layer above its heads, a kv head a quarter below its query heads, centred under them), x the head (MLPs and
    the ends at 0); ``group`` query heads per kv head."""
    if node == "input":
        return 0.0, -1.0
    if node == "logits":
        return 0.0, float(n_layers)
    if m := re.fullmatch(r"m(\d+)", node):
        return 0.0, int(m.group(1)) + 0.5
    m = re.fullmatch(r"a(\d+)\.(h|kv)(\d+)", node)
    assert m is not None, node
    if m.group(2) == "kv":
        return 1.0 + (int(m.group(3)) + 0.5) * group - 0.5, int(m.group(1)) - 0.25
    return 1.0 + int(m.group(3)), float(int(m.group(1)))


def edge_attribution_plot(
    res: xr.Dataset, folder: Path, *, highlight: Collection[str] = (), name: str = "edge_attribution", n: int = N_EDGES
) -> list[Path]:
    """The top ``n`` edges as a circuit graph (``folder/NAME.png`` and ``.html``): nodes by layer and head, edges
    drawn with a width by ``|score|``, red where the corrupt sender lowers M (negative score), blue where it raises
    it; the nodes named in ``highlight`` (e.g. ``a9.h1``) filled gold, drawn even when no top edge touches them."""
    top = edge_attribution_summary(res, n)
    names = [str(s) for s in res["sender"].values] + [str(r) for r in res["receiver"].values]
    n_layers = sum(bool(re.fullmatch(r"m\d+", n)) for n in names[: res.sizes["sender"]])
    n_kv = sum(bool(re.fullmatch(r"a0\.kv\d+<k>", n)) for n in names)
    group = sum(bool(re.fullmatch(r"a0\.h\d+", n)) for n in names) // n_kv if n_kv else 1
    nodes = sorted({*top["sender"], *(re.sub(r"<[qkv]>$", "", r) for r in top["receiver"]), *highlight})
    pos = {n: _place(n, n_layers, group) for n in nodes}
    width = 0.5 + 4.0 * top["score"].abs() / max(float(top["score"].abs().max()), 1e-30)
    title = f"Top {len(top)} EAP edges, M = {res.attrs.get('metric', 'M')} (red: lowers M; width: |score|)"
    title += f"\ngold: {', '.join(sorted(highlight))}" if highlight else ""
    fig = Figure(figsize=(8, 6))
    ax = fig.subplots()
    pfig = go.Figure()
    for (_, row), w in zip(top.iterrows(), width, strict=True):
        (x0, y0), (x1, y1) = pos[row["sender"]], pos[re.sub(r"<[qkv]>$", "", row["receiver"])]
        color = "tab:red" if row["score"] < 0 else "tab:blue"
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": color, "lw": float(w)})
        pfig.add_trace(
            go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line={"width": float(w), "color": color[4:]},
                       name=row["edge"], hovertext=f"{row['edge']}: {row['score']:.4g}", showlegend=False)
        )  # fmt: skip
    xs, ys = zip(*(pos[n] for n in nodes), strict=True)
    fill = ["gold" if node in highlight else "white" for node in nodes]
    ax.scatter(xs, ys, s=700, c=fill, edgecolors="black", zorder=3)
    for node in nodes:
        ax.annotate(node, pos[node], ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xlabel("head (MLPs, input and logits at 0)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    png = folder / f"{name}.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=nodes, textposition="top center",
                              marker={"size": 14, "color": fill, "line": {"color": "black", "width": 1}}, showlegend=False))  # fmt: skip
    pfig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer", width=800, height=600, template="simple_white"
    )
    return [png, save_html(pfig, folder / f"{name}.html")]


def atp_vs_exact_plot(table: pd.DataFrame, rho: float, metric: str, png: Path) -> Path:
    """The AtP paper's scatter: per head (``table``'s ``head``, ``atp``, ``exact``), AtP on x and the exact
    activation patching effect on y, the line y = x, and Spearman's ``rho`` in the title."""
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    ax.scatter(table["atp"], table["exact"], s=16, color="tab:blue", zorder=3)
    for row in table.itertuples(index=False):
        ax.annotate(str(row.head), (row.atp, row.exact), xytext=(3, 2), textcoords="offset points", fontsize=7)
    values = np.concatenate([table["atp"].to_numpy(float), table["exact"].to_numpy(float)])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.axhline(0, color="grey", lw=0.4)
    ax.axvline(0, color="grey", lw=0.4)
    ax.set_xlabel(f"AtP: (z' - z) . dM/dz, mean over prompts (M = {metric})", fontsize=8)
    ax.set_ylabel("exact: M(z of the head patched from corrupt) - M(clean), mean", fontsize=8)
    ax.set_title(f"AtP vs exact activation patching, top {len(table)} heads by |AtP|: Spearman rho = {rho:.3f}",
                 fontsize=9)  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    tmp.replace(png)
    return png
