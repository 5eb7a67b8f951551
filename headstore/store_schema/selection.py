"""What a selection of a store's Dataset means: sequence lengths, per-sequence positions, the full set of heads.

One set of rules for ``ds.hs.logits`` and every analyzer (``headstore.analyze._args`` builds on these):

- A position is an ``int`` (numpy integers and 0-d integer arrays count), the same for every sequence,
  negative counting back from the end of each sequence's *real* tokens (its ``length`` column when the
  store has one, else ``seq_len``): ``-1`` is the last real token, not the last padded slot. Or one
  integer per sequence, negatives the same way: a list or numpy array (by index along ``batch``) or an
  ``xarray.DataArray`` along ``batch`` such as ``ds["end_pos"]`` (matched to the Dataset's sequences by
  their ``batch`` labels when both carry them; a dask-backed column is loaded first).
- Analyzers read every head of the model: a Dataset whose ``head`` dim was subset or reordered
  (``ds.isel(head=...)``) is refused with one line, since weights, kv-head maps and results are all
  laid out over the model's heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from headstore.store_schema.errors import HeadstoreError


def is_int(x: Any) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def scalar(value: Any) -> int | None:
    """``value`` as an ``int`` when it is one integer (``int``, a numpy integer, a 0-d integer numpy array or
    DataArray; never a bool or a float), else None."""
    if isinstance(value, xr.DataArray | np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value.item())
    return int(value) if is_int(value) else None


def sequence_lengths(ds: xr.Dataset) -> xr.DataArray:
    """(batch,) real tokens per sequence: the ``length`` column, else ``pos`` for every sequence."""
    if "length" in ds:
        return ds["length"].astype(np.int64)
    return xr.DataArray(np.full(ds.sizes["batch"], ds.sizes["pos"], np.int64), dims="batch")


def lengths(ds: xr.Dataset) -> np.ndarray:
    """(batch,) real tokens per sequence, loaded."""
    return np.asarray(sequence_lengths(ds).values, dtype=np.int64)


def labels(ds: xr.Dataset) -> np.ndarray:
    """The ``batch`` labels (original sequence numbers), or 0..n-1 where the Dataset has no such coordinate."""
    return np.asarray(ds["batch"].values) if "batch" in ds.coords else np.arange(ds.sizes["batch"])


def _span(labels: np.ndarray) -> str:
    """``[0, 1, 2, 5]``; ``[0, 1, 2, 3, 4, 5, ...] (100 sequences)`` for many."""
    if labels.size <= 8:
        return str(labels.tolist())
    return f"[{', '.join(str(x) for x in labels[:6].tolist())}, ...] ({labels.size} sequences)"


def _by_label(ds: xr.Dataset, value: xr.DataArray, what: str) -> xr.DataArray:
    """``value`` (dims ``batch``) in the Dataset's sequence order, matched by ``batch`` label when both have labels."""
    if "batch" not in value.coords or "batch" not in ds.coords:
        return value
    mine, theirs = np.asarray(ds["batch"].values), np.asarray(value["batch"].values)
    if np.array_equal(mine, theirs):
        return value
    missing = np.setdiff1d(mine, theirs)
    if missing.size or np.unique(theirs).size != theirs.size:
        raise HeadstoreError(
            f"{what} is labelled with sequences {_span(theirs)}, which do not cover this Dataset's "
            f"sequences {_span(mine)}: give one value per sequence of this Dataset"
        )
    return value.sel(batch=mine)


def per_sequence(ds: xr.Dataset, value: Any, what: str) -> np.ndarray:
    """An int (repeated) or one integer per sequence -> loaded (batch,) int64, as given (no range check)."""
    n = ds.sizes["batch"]
    one = scalar(value)
    if one is not None:
        return np.full(n, one, np.int64)
    if isinstance(value, xr.DataArray):
        if value.dims != ("batch",):
            raise HeadstoreError(f"{what} must be a DataArray along batch only, got dims {value.dims}")
        value = _by_label(ds, value, what).values
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != n or (arr.size and arr.dtype.kind not in "iu"):
        raise HeadstoreError(
            f"{what} must be an int or {n} integers (one per sequence), got {arr.dtype} of shape {arr.shape}"
        )
    return arr.astype(np.int64)


def positions(ds: xr.Dataset, value: Any, what: str) -> xr.DataArray:
    """A position (see the module docstring) -> (batch,) int64 positions inside each sequence's real tokens,
    a plain DataArray (no coordinates) for pointwise ``isel(pos=...)``."""
    pos = per_sequence(ds, value, what)
    length = lengths(ds)
    pos = np.where(pos < 0, length + pos, pos)
    bad = np.flatnonzero((pos < 0) | (pos >= length))
    if bad.size:
        i = int(bad[0])
        raise HeadstoreError(
            f"{what} is outside sequence {int(labels(ds)[i])}: position {int(pos[i])} of its {int(length[i])} "
            f"tokens ({bad.size} sequence(s) out of range)"
        )
    return xr.DataArray(pos, dims="batch")


def check_all_heads(ds: xr.Dataset, analyzer: str) -> None:
    """Refuse a Dataset whose ``head`` (or ``kv_head``) dim is not the model's full set, in order."""
    cfg = ds.hs.config
    if "head" in ds.dims:
        got = np.asarray(ds["head"].values) if "head" in ds.coords else np.arange(ds.sizes["head"])
    elif "head" in ds.coords:  # ds.isel(head=2): the dim is gone, a scalar label stays
        got = np.atleast_1d(ds["head"].values)
    else:
        got = None
    kv_cut = "kv_head" in ds.coords and "kv_head" not in ds.dims
    kv_cut = kv_cut or ("kv_head" in ds.dims and ds.sizes["kv_head"] != cfg.n_key_value_heads)
    if (got is not None and not np.array_equal(got, np.arange(cfg.n_heads))) or kv_cut:
        held = f"heads {got.tolist()}" if got is not None else f"{ds.sizes.get('kv_head', 0)} kv heads"
        raise HeadstoreError(
            f"{analyzer} reads all {cfg.n_heads} heads of the model and this Dataset holds {held}: pass every head "
            "and select heads with heads=[(layer, head), ...] where the analyzer takes them, or in its result "
            "(.sel(head=...)), not with ds.isel(head=...)"
        )


def check_same_sequences(a: xr.Dataset, b: xr.Dataset, analyzer: str) -> None:
    """Refuse pairing two Datasets that hold different sequences by ``batch`` label, where either is a part of
    its store (``partial=True`` or a selection); two whole stores of different sizes are left to the size check."""
    la, lb = labels(a), labels(b)
    if np.array_equal(la, lb) or (np.array_equal(la, np.arange(la.size)) and np.array_equal(lb, np.arange(lb.size))):
        return
    raise HeadstoreError(
        f"{analyzer}: the two stores hold different sequences ({_span(la)} vs {_span(lb)}; a partial store keeps "
        "only its completed ones): pair the same sequences, e.g. a, b = xarray.align(a, b, join='inner')"
    )
