"""Tables and figures of ``attribution_patching`` (a (layer, head) heatmap) and ``edge_attribution`` (a circuit
graph of its top edges), for the CLI and the report: ``summary(res) -> DataFrame``, ``plot(res, folder) -> paths``."""

from __future__ import annotations

import re
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


def edge_attribution_plot(res: xr.Dataset, folder: Path) -> list[Path]:
    """The top ``N_EDGES`` edges as a circuit graph: nodes by layer and head, edges drawn with a width by
    ``|score|``, red where the corrupt sender lowers M (negative score), blue where it raises it."""
    top = edge_attribution_summary(res, N_EDGES)
    names = [str(s) for s in res["sender"].values] + [str(r) for r in res["receiver"].values]
    n_layers = sum(bool(re.fullmatch(r"m\d+", n)) for n in names[: res.sizes["sender"]])
    n_kv = sum(bool(re.fullmatch(r"a0\.kv\d+<k>", n)) for n in names)
    group = sum(bool(re.fullmatch(r"a0\.h\d+", n)) for n in names) // n_kv if n_kv else 1
    nodes = sorted({*top["sender"], *(re.sub(r"<[qkv]>$", "", r) for r in top["receiver"])})
    pos = {n: _place(n, n_layers, group) for n in nodes}
    width = 0.5 + 4.0 * top["score"].abs() / max(float(top["score"].abs().max()), 1e-30)
    title = f"Top {len(top)} EAP edges, M = {res.attrs.get('metric', 'M')} (red: lowers M; width: |score|)"
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
    ax.scatter(xs, ys, s=700, color="white", edgecolors="black", zorder=3)
    for n in nodes:
        ax.annotate(n, pos[n], ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xlabel("head (MLPs, input and logits at 0)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    png = folder / "edge_attribution.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    pfig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=nodes, textposition="top center",
                              marker={"size": 14, "color": "white", "line": {"color": "black", "width": 1}}, showlegend=False))  # fmt: skip
    pfig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer", width=800, height=600, template="simple_white"
    )
    return [png, save_html(pfig, folder / "edge_attribution.html")]
