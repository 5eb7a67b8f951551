"""The report's analyzers: which apply to the stores (``plan``), and each one's outcome with its
top-rows table and figures as HTML (``run_analyzers``).

Analyzers are taken from ``analyzers()`` at run time and run through ``run_analyzer`` (the same path
as ``headstore analyze``), so no analyzer module is touched. Outputs already in the results folder
(``headstore analyze --out``, the main job) are reused; the missing ones are computed into it. A
failing analyzer is listed as failed, never fatal. No torch here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from headstore.report.embed import _Figures, embed_plot_files
from headstore.store_schema import HeadstoreError

TOP_ROWS = 10
MAX_DEFAULT_HEADS = 4  # top heads kept per analyzer: the attention viewer's default


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

    from headstore.analyze import registry
    from headstore.report.run import run_analyzer, saved_output

    try:
        specs = registry.analyzers()
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
