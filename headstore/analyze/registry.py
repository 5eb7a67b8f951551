"""The analyzers' declarations: each private module ends with ``SPEC = AnalyzerSpec(...)`` and
``register_analyzer(SPEC)``; importing ``headstore.analyze`` fills the registry (numcodecs' codec registry
is the model). The CLI, the report and the main job read what they need from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

from headstore.store_schema import HeadstoreError


@dataclass(frozen=True)
class AnalyzerSpec:
    """``func(ds, **params) -> Dataset`` (two stores: ``func(ds_a, ds_b, **params)``).

    ``requires``: the store fields and weights it reads by default (its module's ``REQUIRES``);
    ``params``: keyword-only parameter name -> its type (``headstore.analyze.types``).
    """

    name: str
    func: Callable[..., xr.Dataset]
    requires: tuple[str, ...]
    n_stores: int = 1
    doc: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, AnalyzerSpec] = {}


def register_analyzer(spec: AnalyzerSpec) -> None:
    """Add ``spec`` to the registry; a second, different spec under the same name is refused."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old.func is not spec.func:
        raise HeadstoreError(f"analyzer {spec.name!r} is declared twice: give the new one another name")
    _REGISTRY[spec.name] = spec


def analyzers() -> dict[str, AnalyzerSpec]:
    """Name -> spec, sorted by name."""
    return {name: _REGISTRY[name] for name in sorted(_REGISTRY)}


def get_analyzer(name: str) -> AnalyzerSpec:
    specs = analyzers()
    if name not in specs:
        raise HeadstoreError(f"unknown analyzer {name!r}: choose from {', '.join(specs)}")
    return specs[name]


__all__ = ["AnalyzerSpec", "analyzers", "get_analyzer", "register_analyzer"]
