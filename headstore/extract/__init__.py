"""Extraction: run a model once over a dataset and write a headstore store. Imports torch (``extract``,
``ExtractResult``: on first use, so that a plan from a model's config alone, ``extract.plan_config``, runs
without it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headstore.extract.request import ExtractRequest
from headstore.store_schema.errors import missing_dependency

if TYPE_CHECKING:
    from headstore.extract.run import ExtractResult, extract

__all__ = ["ExtractRequest", "ExtractResult", "extract"]


def __getattr__(name: str) -> Any:
    if name in ("extract", "ExtractResult"):
        try:
            from headstore.extract import run
        except ImportError as e:  # torch, transformer-lens, ...: the extract extra not installed
            error = missing_dependency(e, "extraction")
            if error is None:
                raise
            raise error from e
        return getattr(run, name)
    raise AttributeError(f"module 'headstore.extract' has no attribute {name!r}")
