"""Extraction: run a model once over a dataset and write a headstore store. Imports torch."""

from headstore.extract.request import ExtractRequest
from headstore.extract.run import ExtractResult, extract

__all__ = ["ExtractRequest", "ExtractResult", "extract"]
