"""How the CLI finds analyzers: each analyzer module exposes ``SPEC = AnalyzerSpec(...)``.

Modules of ``headstore.analyze`` are discovered by name, so adding an analyzer touches only its
own module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr


@dataclass(frozen=True)
class AnalyzerSpec:
    """``func(ds, **params) -> Dataset`` (two stores: ``func(ds_a, ds_b, **params)``).

    ``summary`` turns the result into a per-head table (written as CSV, top rows printed);
    ``plot`` writes the seed's figure as PNG and HTML under a folder and returns the paths.
    """

    name: str
    func: Callable[..., xr.Dataset]
    requires: tuple[str, ...]
    summary: Callable[[xr.Dataset], pd.DataFrame]
    plot: Callable[[xr.Dataset, Path], list[Path]]
    n_stores: int = 1
    doc: str = ""


def analyzers() -> dict[str, AnalyzerSpec]:
    import headstore.analyze as pkg

    out: dict[str, AnalyzerSpec] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"headstore.analyze.{info.name}")
        spec = getattr(mod, "SPEC", None)
        if isinstance(spec, AnalyzerSpec):
            out[spec.name] = spec
    return dict(sorted(out.items()))
