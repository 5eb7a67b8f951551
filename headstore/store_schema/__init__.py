"""The contract between extract and analyze: layout, dims, dtypes, provenance, validation."""

from headstore.store_schema.errors import HeadstoreError
from headstore.store_schema.layout import DEFAULT_FIELDS, FIELDS, SCHEMA_VERSION, WEIGHTS, parse_fields
from headstore.store_schema.provenance import ModelConfig, Provenance
from headstore.store_schema.read import accessor as _accessor  # noqa: F401 (registers the ds.hs accessor)
from headstore.store_schema.read.integrity import ValidationReport, validate
from headstore.store_schema.read.reader import done_mask, open_store, provenance, read_provenance
from headstore.store_schema.write.create import create_store
from headstore.store_schema.write.writer import StoreWriter

__all__ = [
    "DEFAULT_FIELDS",
    "FIELDS",
    "SCHEMA_VERSION",
    "WEIGHTS",
    "HeadstoreError",
    "ModelConfig",
    "Provenance",
    "StoreWriter",
    "ValidationReport",
    "create_store",
    "done_mask",
    "open_store",
    "parse_fields",
    "provenance",
    "read_provenance",
    "validate",
]
