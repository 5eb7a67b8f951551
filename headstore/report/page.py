"""One self-contained HTML page per store (or store pair): provenance, every applicable analyzer's
figures and top-head tables, and an attention-pattern viewer with token labels.

The page needs no network: plotly.js is inlined once in ``<head>``, figures are inlined by
``headstore.report.embed``. With a results folder (``results=``, ``--results``) analyzer outputs already
there are reused and the missing ones computed into it (``headstore.report.analyzer_section``). No torch here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import html
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from headstore.report.analyzer_section import TOP_ROWS, AnalyzerOutcome, run_analyzers
from headstore.report.attention_viewer import attention_viewer
from headstore.report.embed import _Figures
from headstore.report.options import parse_heads, parse_sequences
from headstore.report.provenance_section import provenance_section
from headstore.store_schema import HeadstoreError, open_store
from headstore.store_schema.read.info import store_info

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.hs-kv .hs-kv{margin:0}.hs-note{color:#555;font-size:13px}.hs-img{max-width:100%}
.hs-figure{margin:12px 0}.hs-caption{color:#777;font-size:12px}.status-ran{color:#176117}.status-skipped{color:#8a6100}
.status-failed{color:#a01616}.status-not{color:#666}code{background:#f4f4f4;padding:0 3px}
"""


def render_report(
    stores: Sequence[str],
    *,
    sequences: str | None = None,
    heads: str | None = None,
    partial: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    top: int = TOP_ROWS,
    results: str | Path | None = None,
    exclude: Mapping[str, str] | None = None,
) -> str:
    """The report page as a string (see ``write_report``)."""
    stores = [str(s) for s in stores]
    if not 1 <= len(stores) <= 2:
        raise HeadstoreError(f"report takes one store or two (a pair such as IOI and its ABC twin), got {len(stores)}")
    infos = [store_info(s) for s in stores]
    datasets = [open_store(s, partial=partial) for s in stores]
    for ds in datasets:  # refuse bad selections before the long part
        parse_sequences(sequences, int(ds.sizes["batch"]))
        parse_heads(heads, ds)
    figs = _Figures()
    with (
        contextlib.nullcontext(str(results))
        if results is not None
        else tempfile.TemporaryDirectory(prefix="headstore-report-")
    ) as workdir:
        outcomes = run_analyzers(
            stores,
            datasets,
            figs,
            workdir=Path(workdir),
            partial=partial,
            scheduler=scheduler,
            progress=progress,
            top=top,
            exclude=exclude,
        )
    labels = [f"store {i + 1}" if len(stores) > 1 else "store" for i in range(len(stores))]

    body: list[str] = []
    title = " + ".join(Path(s.rstrip("/")).name or s for s in stores)
    body.append(f"<h1>headstore report: {html.escape(title)}</h1>")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f"<p class='hs-note'>Generated {now}. Self-contained: opens offline.</p>")
    body.append(
        "<nav><a href='#provenance'>Provenance</a> · <a href='#analyzers'>Analyzers</a> · "
        "<a href='#attention'>Attention patterns</a></nav>"
    )

    body += _provenance(labels, stores, infos)
    body += _analyzers(outcomes)
    body += _attention(labels, datasets, sequences, heads, outcomes, figs)
    return _page(title, body)


def _provenance(labels: Sequence[str], stores: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
    body: list[str] = []
    body.append("<h2 id='provenance'>Provenance</h2>")
    for label, path, info in zip(labels, stores, infos, strict=True):
        if len(stores) > 1:
            body.append(f"<h3>{html.escape(label)}: {html.escape(path)}</h3>")
        body.append(provenance_section(path, info))

    return body


def _analyzers(outcomes: Sequence[AnalyzerOutcome]) -> list[str]:
    body: list[str] = []
    body.append("<h2 id='analyzers'>Analyzers</h2>")
    rows = "".join(
        f"<tr><td><a href='#an-{html.escape(o.name)}'>{html.escape(o.name)}</a></td>"
        f"<td class='status-{o.status.split()[0]}'>{html.escape(o.status)}</td><td>{html.escape(o.reason)}</td></tr>"
        if o.status == "ran"
        else f"<tr><td>{html.escape(o.name)}</td><td class='status-{o.status.split()[0]}'>{html.escape(o.status)}</td>"
        f"<td>{html.escape(o.reason)}</td></tr>"
        for o in outcomes
    )
    body.append(
        f"<table class='hs-table' id='hs-analyzer-status'><tr><th>analyzer</th><th>status</th><th>reason</th></tr>{rows}</table>"
    )
    for o in outcomes:
        if o.status != "ran":
            continue
        body.append(f"<h3 id='an-{html.escape(o.name)}'>{html.escape(o.name)}</h3>")
        if o.doc:
            body.append(f"<p class='hs-note'>{html.escape(o.doc)}</p>")
        body.append(o.html)

    return body


def _attention(
    labels: Sequence[str], datasets: Sequence[xr.Dataset], sequences: str | None, heads: str | None,
    outcomes: Sequence[AnalyzerOutcome], figs: _Figures,
) -> list[str]:  # fmt: skip
    body: list[str] = []
    body.append("<h2 id='attention'>Attention patterns</h2>")
    for label, ds in zip(labels, datasets, strict=True):
        if len(labels) > 1:
            body.append(f"<h3>{html.escape(label)}</h3>")
        body.append(attention_viewer(ds, label, sequences, heads, outcomes, figs))

    return body


def _page(title: str, body: Sequence[str]) -> str:
    import plotly.offline

    plotly_js = plotly.offline.get_plotlyjs()
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>headstore report: {html.escape(title)}</title><style>{CSS}</style>\n"
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script>{plotly_js}</script>\n</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    stores: Sequence[str],
    out: str | Path,
    *,
    sequences: str | None = None,
    heads: str | None = None,
    partial: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    top: int = TOP_ROWS,
    results: str | Path | None = None,
    exclude: Mapping[str, str] | None = None,
) -> Path:
    """Render the report for one store (or a pair, for two-store analyzers) into the HTML file ``out``.

    ``sequences`` (``"0,1"``) and ``heads`` (``"0.1,1.2"``) choose what the attention viewer shows;
    by default the first two sequences and the top heads of the analyzers that ran.

    ``results``: a folder of analyzer outputs for these stores (``OUT`` of ``headstore analyze
    --out OUT``, or a store's folder of the main job). Outputs found there (``NAME/``) are reused,
    not recomputed; the missing ones are computed and saved there. Without it, everything is
    computed in a temporary folder. ``exclude``: analyzer name -> why it is left out of this page.
    """
    page = render_report(
        stores,
        sequences=sequences,
        heads=heads,
        partial=partial,
        scheduler=scheduler,
        progress=progress,
        top=top,
        results=results,
        exclude=exclude,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
