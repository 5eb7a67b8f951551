"""The CLI's view of the declared analyzers (``headstore.analyze.registry``): each declaration with the
``--param`` string parser of each of its parameter types (``headstore.cli.parse``) and its presentation
(``headstore.report.presenters``). Nothing here is stated twice: adding an analyzer touches its own module
(and its figure), not this file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr

from headstore.analyze import registry
from headstore.cli import parse as P
from headstore.report.presenters import presenter


@dataclass(frozen=True)
class CliAnalyzer:
    """A declaration (``spec``) as the command line uses it: ``params`` maps each option to its parser."""

    spec: registry.AnalyzerSpec
    params: Mapping[str, P.Parser]
    summary: Callable[[xr.Dataset], pd.DataFrame]
    plot: Callable[[xr.Dataset, Path], list[Path]]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def func(self) -> Callable[..., xr.Dataset]:
        return self.spec.func

    @property
    def requires(self) -> tuple[str, ...]:
        return self.spec.requires

    @property
    def n_stores(self) -> int:
        return self.spec.n_stores

    @property
    def doc(self) -> str:
        return self.spec.doc


def view(spec: registry.AnalyzerSpec) -> CliAnalyzer:
    shown = presenter(spec.name)
    return CliAnalyzer(spec, P.parsers(spec.params), shown.summary, shown.plot)


def analyzers() -> dict[str, CliAnalyzer]:
    """Name -> the CLI's view of each declared analyzer, sorted by name."""
    return {name: view(spec) for name, spec in registry.analyzers().items()}
