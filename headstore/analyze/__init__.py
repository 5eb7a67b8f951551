"""Analyzers: each a function from a store's ``xarray.Dataset`` to an ``xarray.Dataset``.

They read only the store (no torch, no model, no tokenizer) and run lazily with dask. Public
functions are re-exported lazily here: ``from headstore.analyze import copy_suppression``.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    from headstore.analyze._registry import analyzers

    for spec in analyzers().values():
        if spec.func.__name__ == name:
            return spec.func
    raise AttributeError(f"module 'headstore.analyze' has no attribute {name!r}")


def run(name: str, *stores: Any, **params: Any) -> Any:
    from headstore.analyze._registry import analyzers

    return analyzers()[name].func(*stores, **params)


__all__ = ["importlib", "run"]
