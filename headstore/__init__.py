"""headstore: a precomputed activation store with offline analyzers for attention heads.

``import headstore`` never imports torch: analysis needs only the store.
"""

from headstore.store_schema import HeadstoreError, open_store, provenance, validate

__version__ = "0.1.0"
__all__ = ["HeadstoreError", "__version__", "open_store", "provenance", "validate"]
