"""The census page of the main job: the heads of every kind, how the induction heads compose, and the
seed experiments run on heads chosen from the data. One self-contained HTML file (plotly.js inlined)."""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from headstore.report.embed import _Figures, embed_plot_files
from headstore.report.page import CSS


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, classes="hs-table", border=0, float_format=lambda v: f"{v:.4g}", na_rep="NaN")


def write_census_report(out: Path, title: str, intro: str, sections: Sequence[Section]) -> Path:
    """Write the page to ``out`` (atomically: a temporary file renamed into place)."""
    import plotly.offline

    figs = _Figures()
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='hs-note'>{html.escape(intro)}</p>"]
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f"<p class='hs-note'>Generated {now}. Self-contained: opens offline.</p>")
    body.append(
        "<nav>" + " · ".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)) + "</nav>"
    )
    for i, s in enumerate(sections):
        body.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            body.append(f"<p>{html.escape(s.text)}</p>")
        for caption, df in s.tables:
            body.append(f"<h3>{html.escape(caption)}</h3>{_table(df)}")
        if s.figures:
            body.append(embed_plot_files(s.figures, figs))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style>\n"
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script>{plotly.offline.get_plotlyjs()}</script>\n</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
