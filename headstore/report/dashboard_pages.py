"""The dashboard's HTML (``headstore.report.dashboard``): the index grid and one page per head. Plain HTML and
inline CSS, no scripts; hover text is the ``title`` attribute.

An example is a window of its sequence's tokens as text: ``WINDOW`` tokens either side of the attended key and
before the query (a gap between the two shown as ``…``). Every shown key the query can see has a background
as strong as the query's attention to it and says its weight on hover (``title``, and ``data-weight``); the
example's key has class ``hs-key``, its query ``hs-query``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr


@dataclass
class SiteData:
    """Everything the pages show, computed once for the whole store."""

    ds: xr.Dataset
    title: str
    scores: xr.Dataset
    kinds: xr.DataArray
    top: xr.Dataset
    rows: dict[tuple[int, int, int], np.ndarray]  # (layer index, head, rank) -> the query's attention row
    effects: xr.Dataset | None
    similarity: xr.Dataset
    circuits: dict[tuple[int, int], dict[str, list[tuple[str, str, float]]]] = field(default_factory=dict)
    token_ids: dict[int, np.ndarray] = field(default_factory=dict)  # batch label -> ids of the examples' sequences
    notes: list[str] = field(default_factory=list)


WINDOW = 8
COLOURS = {
    "previous_token": "#4e79a7", "induction": "#e15759", "duplicate_token": "#f28e2b", "bos": "#9c9c9c",
    "other": "#e8e8e8", "not measured": "#ffffff",
}  # fmt: skip
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.hs-note{color:#555;font-size:13px}
.hs-grid td{padding:0}.hs-grid a{display:block;padding:6px 8px;color:#111;text-decoration:none;font-size:12px}
.hs-ex{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;margin:6px 0;padding:4px;border:1px solid #eee}
.hs-ex span.hs-tok{border-radius:2px}.hs-key{outline:2px solid #c00;font-weight:bold}
.hs-query{text-decoration:underline;text-decoration-thickness:2px}.hs-meta{color:#666;font-size:12px}
.hs-gap{color:#999}
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def text(token: str) -> str:
    """A token as shown in an example: newlines as ↵, tabs as →, the rest as is."""
    return token.replace("\r", "").replace("\n", "↵").replace("\t", "→")


def _legend() -> str:
    cells = "".join(f"<td style='background:{c}'>{html.escape(k)}</td>" for k, c in COLOURS.items())
    return f"<table><tr><th>kind</th>{cells}</tr></table>"


def index_page(data: SiteData, page_name: Callable[[int, int], str]) -> str:
    ds, kinds = data.ds, data.kinds
    prov = ds.hs.provenance
    head_ids = list(range(ds.sizes["head"]))
    rows = []
    for i, layer in enumerate(ds.hs.layers):
        cells = []
        for h in head_ids:
            kind = str(kinds.values[i, h])
            tip = ", ".join(f"{v} {float(data.scores[v].values[i, h]):.2f}" for v in _score_names(data))
            cells.append(
                f"<td style='background:{COLOURS.get(kind, '#fff')}'><a class='hs-head' href='heads/{page_name(layer, h)}'"
                f" title='{html.escape(kind)}: {html.escape(tip)}'>{layer}.{h}</a></td>"
            )
        rows.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    header = "".join(f"<th>head {h}</th>" for h in head_ids)
    notes = "".join(f"<p class='hs-note'>{html.escape(n)}</p>" for n in data.notes)
    body = (
        f"<h1>Heads of {html.escape(data.title)}</h1>"
        f"<p class='hs-note'>Model {html.escape(str(prov.model.name))}, dataset "
        f"{html.escape(str(prov.dataset.spec or prov.dataset.kind))}: "
        f"{ds.sizes['batch']} sequences x {ds.sizes['pos']} positions. Colour: the census kind "
        "(the highest head-scores kind reaching 0.4, else other). Click a head for its examples.</p>"
        f"{_legend()}{notes}<table class='hs-grid'><tr><th></th>{header}</tr>{''.join(rows)}</table>"
        f"{_clusters(data, page_name)}"
    )
    return _page(f"Heads of {data.title}", body)


def _clusters(data: SiteData, page_name: Callable[[int, int], str]) -> str:
    """The head-similarity clusters with more than one head, in the similarity order."""
    sim = data.similarity
    members: dict[int, list[tuple[int, int]]] = {}
    for L, h in zip(sim["order_layer"].values, sim["order_head"].values):
        c = int(sim["cluster"].sel(layer=L, head=h))
        if c >= 0:
            members.setdefault(c, []).append((int(L), int(h)))
    groups = [m for m in members.values() if len(m) > 1]
    if not groups:
        return ""
    items = "".join(
        "<li>" + ", ".join(f"<a href='heads/{page_name(L, h)}'>{L}.{h}</a>" for L, h in m) + "</li>" for m in groups
    )
    threshold = sim.attrs.get("threshold", "")
    return f"<h2>Families of heads (pattern correlation above about {threshold})</h2><ul>{items}</ul>"


def _score_names(data: SiteData) -> list[str]:
    return [str(n) for n, v in data.scores.data_vars.items() if v.dims == ("layer", "head")]


def example(tokens: list[str], q: int, k: int, row: np.ndarray | None, meta: str) -> str:
    """One example as text: the window around key ``k`` and query ``q``; ``row`` the query's attention (to keys
    0..q), shown as each key's background and hover text."""
    shown = sorted({*range(max(0, k - WINDOW), min(q, k + WINDOW) + 1), *range(max(0, q - WINDOW), q + 1)})
    parts, last = [], None
    for p in shown:
        if last is not None and p != last + 1:
            parts.append("<span class='hs-gap'> … </span>")
        last = p
        cls = ["hs-tok", *(["hs-key"] if p == k else []), *(["hs-query"] if p == q else [])]
        attrs = f"class='{' '.join(cls)}' data-pos='{p}'"
        if row is not None and p < row.size and np.isfinite(row[p]):
            w = float(row[p])
            attrs += (
                f" data-weight='{w:.4f}' style='background:rgba(255,140,0,{min(1.0, w):.3f})'"
                f" title='key {p} {html.escape(repr(tokens[p]))}: attention {w:.3f} from query {q}'"
            )
        parts.append(f"<span {attrs}>{html.escape(text(tokens[p]))}</span>")
    return f"<div class='hs-ex'><span class='hs-meta'>{html.escape(meta)}</span>\n{''.join(parts)}</div>"


def _tokens(data: SiteData, seq: int) -> list[str]:
    return [str(t) for t in data.ds.hs.vocab[data.token_ids[seq]].tolist()]


def _attention_examples(data: SiteData, i: int, h: int) -> str:
    ex = data.top.isel(layer=i, head=h)
    out = []
    for r in range(ex.sizes["rank"]):
        seq = int(ex["sequence"].values[r])
        if seq < 0:
            continue
        q, k, w = int(ex["query_pos"].values[r]), int(ex["key_pos"].values[r]), float(ex["weight"].values[r])
        meta = f"#{r + 1}  sequence {seq}, query {q} → key {k}: weight {w:.3f}"
        out.append(example(_tokens(data, seq), q, k, data.rows.get((i, h, r)), meta))
    return "".join(out) or "<p class='hs-note'>No example (the pattern of this layer was not stored).</p>"


def _effect_examples(data: SiteData, i: int, h: int) -> str:
    if data.effects is None:
        return "<p class='hs-note'>Not available for this store.</p>"
    parts = []
    for o, name in enumerate(("largest", "most negative")):
        ex = data.effects.isel(layer=i, head=h, order=o)
        items = []
        for r in range(ex.sizes["rank"]):
            seq = int(ex["sequence"].values[r])
            if seq >= 0:
                p, e, nxt = int(ex["pos"].values[r]), float(ex["effect"].values[r]), str(ex["target_str"].values[r])
                meta = f"sequence {seq}, position {p}: effect {e:+.4f} on the logit of the next token {nxt!r}"
                items.append(example(_tokens(data, seq), p, p, None, meta))
        parts.append(f"<h3>{name}</h3>{''.join(items)}")
    return "".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """Table cell HTML, not escaped."""


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def head_page(
    data: SiteData, i: int, layer: int, h: int, similar: list[tuple[int, int, float]],
    page_name: Callable[[int, int], str],
) -> str:  # fmt: skip
    kind = str(data.kinds.values[i, h])
    scores = [[_Raw(html.escape(n)), float(data.scores[n].values[i, h])] for n in _score_names(data)]
    circ = data.circuits.get((i, h), {})
    sims = [[_Raw(f"<a href='{page_name(L, hh)}'>{L}.{hh}</a>"), v] for L, hh, v in similar]
    body = (
        f"<p><a href='../index.html'>all heads</a></p><h1>Head {layer}.{h} <small>({html.escape(kind)})</small></h1>"
        f"<h2>Census scores</h2>{_table(['score', 'value'], scores)}"
        f"<h2>Top attention</h2><p class='hs-note'>Key outlined in red, query underlined; the background of each "
        "key is the query's attention to it (hover for the weight).</p>"
        f"{_attention_examples(data, i, h)}"
        f"<h2>Top direct effects on the next token's logit</h2>{_effect_examples(data, i, h)}"
        f"<h2>OV circuit: what the attended tokens promote</h2>"
        f"{_table(['source', 'output', 'C_OV'], [list(x) for x in circ.get('ov', [])])}"
        f"<h2>QK circuit: the keys its query tokens prefer</h2>"
        f"{_table(['query', 'key', 'C_QK'], [list(x) for x in circ.get('qk', [])])}"
        f"<h2>Most similar heads (pattern correlation)</h2>{_table(['head', 'correlation'], sims)}"
    )
    return _page(f"Head {layer}.{h} of {data.title}", body)
