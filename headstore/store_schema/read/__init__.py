"""The machinery that reads a store: open_store, weights-store resolution, the ds.hs accessor, validate, info."""
