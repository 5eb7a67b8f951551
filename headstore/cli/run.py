"""``headstore analyze``'s edge: ``--param`` strings become the analyzer's Python values here, then the
library runs it (``headstore.report.run``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from headstore.analyze.registry import AnalyzerSpec
from headstore.cli import parse
from headstore.cli.registry import CliAnalyzer
from headstore.report import run as _run
from headstore.report.presenters import Presenter
from headstore.report.run import dask_scheduler as dask_scheduler
from headstore.report.run import safe_child as safe_child
from headstore.report.run import saved_output as _saved_output
from headstore.store_schema import HeadstoreError, open_store


def _spec(spec: AnalyzerSpec | CliAnalyzer) -> AnalyzerSpec:
    return spec.spec if isinstance(spec, CliAnalyzer) else spec


def run_analyzer(
    spec: AnalyzerSpec | CliAnalyzer,
    stores: Sequence[str],
    out: Path,
    params: Mapping[str, Any] | None = None,
    *,
    param_strings: Sequence[str] = (),
    scheduler: str | None = None,
    partial: bool = False,
    progress: bool = False,
) -> tuple[pd.DataFrame, list[Path]]:
    """``headstore.report.run.run_analyzer``, with ``--param key=value`` strings parsed against the first store."""
    view = spec if isinstance(spec, CliAnalyzer) else None
    spec = _spec(spec)
    shown = Presenter(view.summary, view.plot) if view else None
    parsers = view.params if view else parse.parsers(spec.params)
    params = dict(params or {})
    if param_strings:
        if len(stores) != spec.n_stores:
            raise HeadstoreError(f"{spec.name} takes {spec.n_stores} store(s), got {len(stores)}")
        first = open_store(stores[0], partial=partial)
        params.update(parse.params(param_strings, parsers, first))
    return _run.run_analyzer(
        spec, stores, out, params, scheduler=scheduler, partial=partial, progress=progress, shown=shown
    )


def saved_output(spec: AnalyzerSpec | CliAnalyzer, out: Path) -> tuple[pd.DataFrame, list[Path]] | None:
    return _saved_output(_spec(spec), out)


__all__ = ["dask_scheduler", "run_analyzer", "safe_child", "saved_output"]
