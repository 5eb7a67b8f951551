"""The commands that write pages: ``headstore report`` (one HTML page) and ``headstore dashboard`` (a site)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def report(
    stores: Annotated[
        list[str], typer.Argument(help="one store, or two (e.g. IOI and its ABC twin) for two-store analyzers")
    ],
    out: Annotated[Path, typer.Option(help="HTML file to write")] = Path("report.html"),
    sequences: Annotated[str | None, typer.Option(help="sequences in the attention viewer, e.g. 0,1")] = None,
    heads: Annotated[
        str | None, typer.Option(help="heads in the attention viewer, LAYER.HEAD list, e.g. 0.1,1.2")
    ] = None,
    partial: Annotated[bool, typer.Option(help="report on the completed part of an incomplete store")] = False,
    scheduler: Annotated[str | None, typer.Option(help="address of a dask.distributed scheduler")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    results: Annotated[
        Path | None, typer.Option(help="folder of analyzer outputs (analyze --out): reuse them, save the missing ones")
    ] = None,
) -> None:
    """One self-contained HTML page: provenance, every applicable analyzer, attention patterns."""
    from headstore.report.page import write_report

    path = write_report(
        stores,
        out,
        sequences=sequences,
        heads=heads,
        partial=partial,
        scheduler=scheduler,
        progress=progress,
        results=results,
    )
    console.print(f"wrote {path}")


def dashboard(
    store: Annotated[str, typer.Argument(help="store path or URL")],
    out: Annotated[Path, typer.Argument(help="folder to write the site into (index.html, heads/)")],
    k: Annotated[int, typer.Option(help="examples per head")] = 10,
    partial: Annotated[bool, typer.Option(help="use only the completed part of an incomplete store")] = False,
) -> None:
    """A static site about every head: a grid by census kind, a page per head with its top examples."""
    from headstore.report.dashboard import write_dashboard

    index = write_dashboard(store, out, k=k, partial=partial)
    console.print(f"wrote {index} (open it, or: headstore serve {out})", soft_wrap=True)
