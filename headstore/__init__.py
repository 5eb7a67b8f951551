"""headstore: a precomputed activation store with offline analyzers for attention heads.

``import headstore`` never imports torch: analysis needs only the store. Importing it registers the
``ds.hs`` accessor on xarray Datasets (``headstore.store_schema.read.accessor``).
"""

from headstore.store_schema import HeadstoreError, ModelConfig, Provenance, open_store, provenance, validate

__version__ = "0.1.0"
__all__ = ["HeadstoreError", "ModelConfig", "Provenance", "__version__", "open_store", "provenance", "validate"]
