"""Figures inlined into a self-contained HTML page (the report, the census page).

Every plotly figure becomes a ``<div>`` plus a ``Plotly.newPlot`` call with its JSON inlined, drawn by
the plotly.js the page inlines once; an analyzer's figures are read back from the HTML files its
``plot`` writes (the JSON passed to ``Plotly.newPlot``). Static images become base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAGE_WIDTH = 1260  # px inside the page's 1300 px column


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
