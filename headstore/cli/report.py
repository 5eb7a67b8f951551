"""One self-contained HTML page per store (or store pair): provenance, every applicable analyzer's
figures and top-head tables, and an attention-pattern viewer with token labels.

The page needs no network: plotly.js is inlined once in ``<head>``, every figure is a ``<div>``
plus a ``Plotly.newPlot`` call with its JSON inlined, and static images are base64 data URIs.
Analyzers are taken from ``analyzers()`` at run time and run through ``run_analyzer`` (the same
path as ``headstore analyze``); their figures are read back from the HTML files their ``plot``
writes (the JSON passed to ``Plotly.newPlot``), so no analyzer module is touched. With a results
folder (``results=``, ``--results``) analyzer outputs already there (``headstore analyze --out``,
the main job) are reused, and the missing ones are computed into it. No torch here.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import inspect
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from headstore.analyze import _args
from headstore.cli import parse
from headstore.store_schema import HeadstoreError, open_store
from headstore.store_schema.info import store_info

TOP_ROWS = 10
PAGE_WIDTH = 1260  # px inside the page's 1300 px column
MAX_DEFAULT_HEADS = 4
MAX_DEFAULT_SEQUENCES = 2


# --------------------------------------------------------------------------------------------------
# Parsing the viewer's selections


def parse_sequences(spec: str | None, n: int) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (indices among the store's completed sequences); default: the first two."""
    if spec is None or not spec.strip():
        return list(range(min(MAX_DEFAULT_SEQUENCES, n)))
    out: list[int] = []
    for i in parse.integers(spec, "--sequences"):
        if not 0 <= i < n:
            raise HeadstoreError(f"--sequences {i} is out of range: the store has {n} sequences (0..{n - 1})")
        if i not in out:
            out.append(i)
    return out


def parse_heads(spec: str | None, ds: xr.Dataset) -> list[tuple[int, int]]:
    """``"0.1,1.2"`` -> ``[(0, 1), (1, 2)]`` (model layer, head); checked against the store, repeats dropped."""
    if spec is None or not spec.strip():
        return []
    pairs = list(dict.fromkeys(parse.heads(spec, "--heads")))
    return _args.heads(ds, pairs, "--heads")


# --------------------------------------------------------------------------------------------------
# Figures: every plotly figure becomes a div + a newPlot call on the shared, inlined plotly.js


def _js_json(value: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>`` or ``<!--`` can close or confuse the element."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


class _Figures:
    def __init__(self) -> None:
        self.n = 0

    def div(self, data: Any, layout: Any, config: Any | None = None) -> str:
        self.n += 1
        fid = f"hs-fig-{self.n}"
        cfg = {"responsive": True, "displaylogo": False, **(config if isinstance(config, dict) else {})}
        if isinstance(layout, dict) and layout.get("width", 0) > PAGE_WIDTH:  # wider than the page: fit it
            layout = {k: v for k, v in layout.items() if k != "width"} | {"autosize": True}
        return (
            f'<div id="{fid}" class="hs-plot"></div>\n'
            f"<script>Plotly.newPlot({_js_json(fid)}, {_js_json(data)}, {_js_json(layout)}, {_js_json(cfg)});</script>\n"
        )


def plotly_figures_in_html(text: str) -> list[tuple[Any, Any, Any]]:
    """``(data, layout, config)`` of every ``Plotly.newPlot(id, data, layout, config)`` call in an HTML file."""
    dec = json.JSONDecoder()
    out: list[tuple[Any, Any, Any]] = []
    start = 0
    while True:
        i = text.find("Plotly.newPlot(", start)
        if i < 0:
            return out
        start = i + len("Plotly.newPlot(")
        try:
            args: list[Any] = []
            pos = start
            for _ in range(4):
                while text[pos] in " \t\r\n":
                    pos += 1
                if text[pos] == ")":
                    break
                value, pos = dec.raw_decode(text, pos)
                args.append(value)
                while text[pos] in " \t\r\n":
                    pos += 1
                if text[pos] == ",":
                    pos += 1
        except (ValueError, IndexError):
            continue  # not a literal call (e.g. plotly.js's own source): skip it
        if len(args) >= 3 and isinstance(args[1], list) and isinstance(args[2], dict):
            out.append((args[1], args[2], args[3] if len(args) > 3 else None))


def _img(path: Path) -> str:
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix]
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="hs-img" alt="{html.escape(path.name)}" src="data:{mime};base64,{data}">'


def embed_plot_files(paths: Sequence[Path], figs: _Figures) -> str:
    """Interactive figures from the ``.html`` files; images inline (folded away when an interactive
    twin with the same stem exists)."""
    parts: list[str] = []
    interactive = set()
    for p in paths:
        if p.suffix == ".html" and p.is_file():
            found = plotly_figures_in_html(p.read_text(encoding="utf-8", errors="replace"))
            if found:
                interactive.add(p.stem)
            for data, layout, config in found:
                parts.append(f'<div class="hs-figure"><div class="hs-caption">{html.escape(p.name)}</div>')
                parts.append(figs.div(data, layout, config))
                parts.append("</div>")
    for p in paths:
        if p.suffix in (".png", ".svg", ".jpg", ".jpeg") and p.is_file():
            if p.stem in interactive:
                parts.append(f"<details><summary>static image {html.escape(p.name)}</summary>{_img(p)}</details>")
            else:
                parts.append(
                    f'<div class="hs-figure"><div class="hs-caption">{html.escape(p.name)}</div>{_img(p)}</div>'
                )
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Analyzers


@dataclass
class AnalyzerOutcome:
    name: str
    status: str  # "ran", "skipped", "failed", "not applicable"
    reason: str = ""
    doc: str = ""
    summary: pd.DataFrame | None = None
    html: str = ""
    heads: list[tuple[int, int]] = field(default_factory=list)


def required_params(func: Callable[..., Any], n_stores: int) -> list[str]:
    """Parameters after the store arguments that have no default (the report cannot guess them)."""
    params = list(inspect.signature(func).parameters.values())[n_stores:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def plan(specs: dict[str, Any], datasets: Sequence[xr.Dataset]) -> tuple[list[Any], list[AnalyzerOutcome]]:
    """Which analyzers to run on these stores, and why the others are left out."""
    run, left = [], []
    for spec in specs.values():
        doc = str(getattr(spec, "doc", "") or "")
        if spec.n_stores != len(datasets):
            left.append(
                AnalyzerOutcome(
                    spec.name, "not applicable", f"takes {spec.n_stores} store(s), report got {len(datasets)}", doc
                )
            )
            continue
        missing = [r for r in spec.requires if r not in datasets[0]]
        if missing:
            left.append(AnalyzerOutcome(spec.name, "not applicable", f"store lacks {', '.join(missing)}", doc))
            continue
        try:
            needed = required_params(spec.func, spec.n_stores)
        except (TypeError, ValueError):
            needed = []
        if needed:
            left.append(
                AnalyzerOutcome(spec.name, "skipped", f"needs parameters {', '.join(needed)} (no defaults)", doc)
            )
            continue
        run.append(spec)
    return run, left


def _top_heads(summary: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    if not {"layer", "head"} <= set(summary.columns):
        return []
    out: list[tuple[int, int]] = []
    for L, h in summary[["layer", "head"]].itertuples(index=False):
        try:
            pair = (int(L), int(h))
        except (TypeError, ValueError):
            continue
        if pair not in out:
            out.append(pair)
        if len(out) >= k:
            break
    return out


def _table(df: pd.DataFrame, top: int) -> str:
    shown = df.head(top)
    body = shown.to_html(index=False, classes="hs-table", border=0, float_format=lambda v: f"{v:.4g}", na_rep="NaN")
    more = f"<p class='hs-note'>top {len(shown)} of {len(df)} rows</p>" if len(df) > len(shown) else ""
    return body + more


def run_analyzers(
    stores: Sequence[str],
    datasets: Sequence[xr.Dataset],
    figs: _Figures,
    *,
    workdir: Path,
    partial: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
    top: int = TOP_ROWS,
    exclude: Mapping[str, str] | None = None,
) -> list[AnalyzerOutcome]:
    from tqdm.auto import tqdm

    from headstore.cli.run import run_analyzer, saved_output

    try:
        from headstore.cli.registry import analyzers

        specs = analyzers()
    except Exception as e:  # a broken analyzer module must not cost the rest of the page
        return [AnalyzerOutcome("(registry)", "failed", f"could not list analyzers: {type(e).__name__}: {e}")]
    to_run, outcomes = plan(specs, datasets)
    excluded = [s for s in to_run if s.name in (exclude or {})]
    to_run = [s for s in to_run if s not in excluded]
    outcomes += [AnalyzerOutcome(s.name, "skipped", (exclude or {})[s.name], str(s.doc or "")) for s in excluded]
    bar = tqdm(to_run, desc="analyzers", unit="analyzer", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        doc = str(getattr(spec, "doc", "") or "")
        try:
            saved = saved_output(spec, workdir)
            summary, paths = saved or run_analyzer(
                spec, list(stores), workdir, {}, scheduler=scheduler, partial=partial
            )
        except HeadstoreError as e:
            outcomes.append(AnalyzerOutcome(spec.name, "skipped", str(e), doc))
            continue
        except Exception as e:  # an analyzer's bug: listed, never fatal for the report
            outcomes.append(AnalyzerOutcome(spec.name, "failed", f"{type(e).__name__}: {e}", doc))
            continue
        try:
            body = _table(summary, top) + embed_plot_files(paths, figs)
        except Exception as e:
            outcomes.append(AnalyzerOutcome(spec.name, "failed", f"rendering: {type(e).__name__}: {e}", doc))
            continue
        outcomes.append(
            AnalyzerOutcome(
                spec.name,
                "ran",
                "saved output reused" if saved else "",
                doc,
                summary,
                body,
                _top_heads(summary, MAX_DEFAULT_HEADS),
            )
        )
    order = {name: i for i, name in enumerate(specs)}
    return sorted(outcomes, key=lambda o: order.get(o.name, -1))


# --------------------------------------------------------------------------------------------------
# Attention viewer


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
    chosen = parse_heads(heads, ds) or default_heads(
        ds, outcomes
    )
    parts = [
        f"<p class='hs-note'>Sequences {', '.join(map(str, seqs))}; heads "
        f"{', '.join(f'{L}.{h}' for L, h in chosen)} (pick with <code>--sequences</code> / <code>--heads</code>). "
        "Rows are queries, columns keys; choose the head from the dropdown.</p>"
    ]
    for b in seqs:
        data, layout = attention_figure(ds, b, chosen, f"{label}: sequence {b}")
        parts.append(f'<div class="hs-figure">{figs.div(data, layout)}</div>')
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Provenance


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return _kv(v)
    if isinstance(v, list | tuple):
        return html.escape(", ".join(str(x) for x in v))
    return html.escape(str(v))


def _kv(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in d.items())
    return f"<table class='hs-kv'>{rows}</table>"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def provenance_section(path: str, info: dict[str, Any]) -> str:
    prov = info["provenance"]
    m = prov.get("model", {})
    complete = f"{info['n_complete']}/{info['n_sequences']} sequences complete; done ranges {info['done_ranges']}"
    headline = {
        "store": path,
        "model": m.get("name", ""),
        "architecture": m.get("config", {}).get("architecture", ""),
        "processing": m.get("processing", {}),
        "weights sha256": m.get("weights_sha256", ""),
        "tokenizer": prov.get("tokenizer", {}),
        "dataset": prov.get("dataset", {}),
        "fields": prov.get("fields", []),
        "layers": prov.get("layers", []),
        "seq_len": prov.get("seq_len", ""),
        "storage dtype": prov.get("storage_dtype", ""),
        "batch size": prov.get("batch_size", ""),
        "prepend BOS": prov.get("prepend_bos", ""),
        "completeness": complete,
        "total size": f"{_mb(info['total_bytes'])} ({info['bytes_per_token']:.0f} bytes/token)"
        if info["sizes"]
        else "(remote store)",
        "schema version": prov.get("schema_version", ""),
        "created": prov.get("created", ""),
    }
    sizes = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_mb(v[0])}</td><td>{v[1]:.1f}</td></tr>" for k, v in info["sizes"].items()
    )
    return (
        _kv(headline)
        + "<details><summary>model config, library versions</summary>"
        + _kv({"config": m.get("config", {}), "source": m.get("source", {}), "versions": prov.get("versions", {})})
        + "</details>"
        + (
            "<details><summary>sizes on disk per array</summary><table class='hs-table'>"
            f"<tr><th>array</th><th>on disk</th><th>bytes/token</th></tr>{sizes}</table></details>"
            if sizes
            else ""
        )
    )


# --------------------------------------------------------------------------------------------------
# The page

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
    import plotly.offline

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

    body.append("<h2 id='provenance'>Provenance</h2>")
    for label, path, info in zip(labels, stores, infos, strict=True):
        if len(stores) > 1:
            body.append(f"<h3>{html.escape(label)}: {html.escape(path)}</h3>")
        body.append(provenance_section(path, info))

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

    body.append("<h2 id='attention'>Attention patterns</h2>")
    for label, ds in zip(labels, datasets, strict=True):
        if len(stores) > 1:
            body.append(f"<h3>{html.escape(label)}</h3>")
        body.append(attention_viewer(ds, label, sequences, heads, outcomes, figs))

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
