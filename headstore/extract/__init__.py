"""Extraction: run a model once over a dataset and write a headstore store. Imports torch."""

from headstore.extract.run import ExtractRequest, ExtractResult, extract

__all__ = ["ExtractRequest", "ExtractResult", "extract"]
