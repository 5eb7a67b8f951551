"""Extraction: run a model once over a dataset and write a headstore store. Imports torch."""

from headstore.store_schema.errors import missing_dependency

try:
    from headstore.extract.request import ExtractRequest
    from headstore.extract.run import ExtractResult, extract
except ImportError as e:  # torch, transformer-lens, ...: the extract extra not installed
    _error = missing_dependency(e, "extraction")
    if _error is None:
        raise
    raise _error from e

__all__ = ["ExtractRequest", "ExtractResult", "extract"]
