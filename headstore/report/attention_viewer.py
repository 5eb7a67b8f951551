"""The report's attention viewer: per chosen sequence, one plotly (query, key) heatmap of the stored
``pattern`` with the token strings as labels and a dropdown to switch between the chosen heads."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from headstore.report.analyzer_section import MAX_DEFAULT_HEADS, AnalyzerOutcome
from headstore.report.embed import _Figures
from headstore.report.options import parse_heads, parse_sequences
from headstore.store_schema import selection


def display_token(s: str) -> str:
    """Whitespace made visible: spaces as '␣', newlines and tabs escaped; empty as '∅'."""
    if s == "":
        return "∅"
    return s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣")


def sequence_length(ds: xr.Dataset, b: int) -> int:
    """Real length of sequence ``b`` (IOI prompts are padded to the longest)."""
    n = int(ds.sizes["pos"])
    for col, plus in (("length", 0), ("last_pos", 1), ("end_pos", 1)):
        if col in ds and ds[col].dims == ("batch",):
            try:
                return max(1, min(n, int(ds[col].isel(batch=b).values) + plus))
            except (TypeError, ValueError):
                continue
    return n


def sequence_name(ds: xr.Dataset, b: int) -> str:
    """Row ``b``'s sequence as the store numbers it (its ``batch`` label): on a partial store or a subset the
    rows skip the sequences not there, so row 0 may be sequence 8; ``"8 (row 0)"`` then."""
    label = int(selection.labels(ds)[b])
    return str(b) if label == b else f"{label} (row {b})"


def token_strings(ds: xr.Dataset, b: int, n: int) -> list[str]:
    ids = np.asarray(ds["tokens"].isel(batch=b, pos=slice(0, n)).values).astype(np.int64)
    if "vocab" in ds:
        vocab = ds["vocab"]
        return [str(vocab.isel(d_vocab=int(i)).values) if 0 <= i < vocab.sizes["d_vocab"] else f"<{i}>" for i in ids]
    return [f"#{int(i)}" for i in ids]


def attention_figure(ds: xr.Dataset, b: int, heads: Sequence[tuple[int, int]], title: str) -> tuple[Any, Any]:
    """One figure for sequence ``b``: a (query, key) heatmap per head, a dropdown to switch heads."""
    n = sequence_length(ds, b)
    toks = [display_token(t) for t in token_strings(ds, b, n)]
    labels = [html.escape(t) for t in toks]  # plotly reads tick text as pseudo-HTML
    hover = [[f"q {q} {labels[q]} → k {k} {labels[k]}" for k in range(n)] for q in range(n)]
    pat = ds["pattern"].isel(batch=b, query_pos=slice(0, n), key_pos=slice(0, n))
    data = []
    for i, (L, h) in enumerate(heads):
        z = np.asarray(pat.sel(layer=L).isel(head=h).values, dtype=np.float64)
        z_list = [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in z]
        data.append(
            {
                "type": "heatmap", "z": z_list, "x": list(range(n)), "y": list(range(n)), "text": hover,
                "hovertemplate": "%{text}<br>attention %{z:.3f}<extra></extra>", "colorscale": "Blues",
                "zmin": 0.0, "zmax": 1.0, "visible": i == 0, "name": f"L{L}H{h}",
            }
        )  # fmt: skip
    ticks = {"tickmode": "array", "tickvals": list(range(n)), "ticktext": labels, "tickfont": {"size": 10}}
    size = max(420, 22 * n + 220)
    head_title = [f"{title} — head {L}.{h}" for L, h in heads]
    layout: dict[str, Any] = {
        "title": {"text": head_title[0] if heads else title},
        "xaxis": {**ticks, "title": {"text": "key"}, "tickangle": -60, "side": "bottom"},
        "yaxis": {**ticks, "title": {"text": "query"}, "autorange": "reversed"},
        "width": size + 120, "height": size, "margin": {"l": 120, "b": 120, "t": 90},
    }  # fmt: skip
    if len(heads) > 1:
        layout["updatemenus"] = [
            {
                "type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top", "active": 0,
                "buttons": [
                    {
                        "label": f"head {L}.{h}", "method": "update",
                        "args": [{"visible": [j == i for j in range(len(heads))]}, {"title": {"text": head_title[i]}}],
                    }
                    for i, (L, h) in enumerate(heads)
                ],
            }
        ]  # fmt: skip
    return data, layout


def default_heads(ds: xr.Dataset, outcomes: Sequence[AnalyzerOutcome]) -> list[tuple[int, int]]:
    """Top heads of the analyzers that ran (up to four), else head 0 of the first four layers."""
    layers = [int(x) for x in ds["layer"].values]
    n_heads = int(ds.sizes["head"])
    out: list[tuple[int, int]] = []
    for o in outcomes:
        for L, h in o.heads:
            if L in layers and 0 <= h < n_heads and (L, h) not in out and len(out) < MAX_DEFAULT_HEADS:
                out.append((L, h))
    return out or [(L, 0) for L in layers[:MAX_DEFAULT_HEADS]]


def attention_viewer(
    ds: xr.Dataset,
    label: str,
    sequences: str | None,
    heads: str | None,
    outcomes: Sequence[AnalyzerOutcome],
    figs: _Figures,
) -> str:
    if "pattern" not in ds:
        return "<p class='hs-note'>This store has no <code>pattern</code>: no attention viewer.</p>"
    seqs = parse_sequences(sequences, int(ds.sizes["batch"]))
    chosen = parse_heads(heads, ds) or default_heads(ds, outcomes)
    names = {b: sequence_name(ds, b) for b in seqs}
    parts = [
        f"<p class='hs-note'>Sequences {', '.join(names.values())}; heads "
        f"{', '.join(f'{L}.{h}' for L, h in chosen)} (pick with <code>--sequences</code> / <code>--heads</code>). "
        "Rows are queries, columns keys; choose the head from the dropdown.</p>"
    ]
    for b in seqs:
        data, layout = attention_figure(ds, b, chosen, f"{label}: sequence {names[b]}")
        parts.append(f'<div class="hs-figure">{figs.div(data, layout)}</div>')
    return "\n".join(parts)
