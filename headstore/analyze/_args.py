"""Checking the Python arguments analyzers take: heads, positions, token ids.

- A head is ``(layer, head)`` with the model's layer number (a tuple, a list or a 2-element integer numpy
  array); a set of heads a sequence of them, an ``(n, 2)`` integer array (e.g. ``np.argwhere(mask)`` over a
  ``(layer, head)`` grid of a store holding every layer) or ``"all"``.
- A position is an ``int`` (the same for every sequence; negative counts back from the end of each
  sequence's real tokens: its ``length`` column when the store has one, else ``seq_len``) or one
  integer per sequence (a list, numpy array or ``xarray.DataArray`` along ``batch``), negatives the same
  way. ``None`` means the store's column of that name. numpy integers and 0-d integer arrays count as ints.
- A token is an id (``int``) or one id per sequence; strings go through ``ds.hs.token_id`` first.
- A key position must not come after the query position that reads it (causal attention):
  :func:`check_causal`.

Everything comes back as plain ints or a loaded ``(batch,)`` int64 DataArray (tiny; used as an indexer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from headstore.analyze.types import Head as Head
from headstore.analyze.types import Heads as Heads
from headstore.analyze.types import Positions as Positions
from headstore.analyze.types import TokenIds as TokenIds
from headstore.store_schema import HeadstoreError, selection
from headstore.store_schema.selection import lengths as lengths
from headstore.store_schema.selection import per_sequence as _per_sequence
from headstore.store_schema.selection import scalar as scalar


def _is_pair(value: Any) -> bool:
    """A ``(layer, head)``: a 2-tuple or list of ints, or a 2-element integer numpy array."""
    if isinstance(value, np.ndarray):
        return value.shape == (2,) and value.dtype.kind in "iu"
    return isinstance(value, tuple | list) and len(value) == 2 and all(selection.is_int(x) for x in value)


def head(ds: xr.Dataset, value: Any, what: str) -> Head:
    """Check one ``(layer, head)`` against the store."""
    if not _is_pair(value):
        raise HeadstoreError(f"{what} must be a (layer, head) pair of ints, e.g. (9, 6), got {value!r}")
    layer, h = int(value[0]), int(value[1])
    layers = ds.hs.layers
    if layer not in layers:
        raise HeadstoreError(f"{what} ({layer}, {h}): layer {layer} is not in this store (it holds layers {layers})")
    n_heads = ds.hs.config.n_heads
    if not 0 <= h < n_heads:
        raise HeadstoreError(f"{what} ({layer}, {h}): head {h} is out of range (the model has heads 0..{n_heads - 1})")
    return layer, h


def heads(ds: xr.Dataset, value: Any, what: str) -> list[Head]:
    """``"all"`` or a sequence of ``(layer, head)`` pairs (duplicates refused) -> a list of pairs."""
    if isinstance(value, str):
        if value != "all":
            raise HeadstoreError(f"{what} must be 'all' or a list of (layer, head) pairs, got the string {value!r}")
        return ds.hs.heads
    if (isinstance(value, tuple) or (isinstance(value, np.ndarray) and value.ndim == 1)) and _is_pair(value):
        pair = (int(value[0]), int(value[1]))
        raise HeadstoreError(f"{what} is a list of (layer, head) pairs: write [{pair!r}], not {value!r}")
    if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2 and value.dtype.kind in "iu":
        value = [(int(a), int(b)) for a, b in value]  # (n, 2), e.g. np.argwhere(mask)
    try:
        items = list(value)
    except TypeError:
        raise HeadstoreError(f"{what} must be 'all' or a list of (layer, head) pairs, got {value!r}") from None
    out = [head(ds, v, what) for v in items]
    if len(set(out)) != len(out):
        raise HeadstoreError(f"{what} names a head twice: {out}")
    return out


def _or_column(ds: xr.Dataset, value: Any, what: str, column: str | None, hint: str) -> Any:
    """``value``, or the store's ``column`` when ``value`` is None (refused, naming both, when absent)."""
    if value is not None:
        return value
    if column is None or column not in ds:
        raise HeadstoreError(f"{what} was not given and this store has no {column!r} column: pass {what}= ({hint})")
    return np.asarray(ds[column].values)


def positions(ds: xr.Dataset, value: Any, what: str, column: str | None = None) -> xr.DataArray:
    """A position argument (see the module docstring) -> (batch,) int64 positions inside each sequence, by the
    rules ``ds.hs.logits`` follows too (``headstore.store_schema.selection.positions``)."""
    value = _or_column(ds, value, what, column, "an int, or one position per sequence")
    return selection.positions(ds, value, what)


def token_ids(ds: xr.Dataset, value: Any, what: str, column: str | None = None) -> xr.DataArray:
    """A token argument -> (batch,) int64 ids, checked against ``d_vocab``."""
    value = _or_column(
        ds, value, what, column, "a token id, or one per sequence; ds.hs.token_id(' Mary') turns a string into an id"
    )
    if isinstance(value, str):
        raise HeadstoreError(f"{what} takes token ids: write ds.hs.token_id({value!r}) to look the string up")
    ids = _per_sequence(ds, value, what)
    d_vocab = ds.hs.config.d_vocab
    if ((ids < 0) | (ids >= d_vocab)).any():
        raise HeadstoreError(f"{what} holds ids outside the vocabulary [0, {d_vocab})")
    return xr.DataArray(ids, dims="batch")


def token(ds: xr.Dataset, value: Any, what: str) -> int:
    """One token: an id, or a string that is exactly one vocabulary entry (``ds.hs.token_id``)."""
    if isinstance(value, str):
        return ds.hs.token_id(value)
    one = scalar(value)
    if one is None or not 0 <= one < ds.hs.config.d_vocab:
        raise HeadstoreError(
            f"{what} must be a token id in [0, {ds.hs.config.d_vocab}) or a token string, got {value!r}"
        )
    return one


def check_causal(ds: xr.Dataset, key: xr.DataArray, key_name: str, query: xr.DataArray, query_name: str) -> None:
    """Refuse a key position after the query position that reads it (both resolved by :func:`positions`): causal
    attention from ``query`` gives it exactly 0, never a measurement. Names the first such sequence by its
    ``batch`` label (its number in the store), as :func:`positions` does."""
    bad = np.flatnonzero(np.asarray(key.values) > np.asarray(query.values))
    if bad.size:
        i = int(bad[0])
        label = int(selection.labels(ds)[i])
        more = f" ({bad.size} sequences in all)" if bad.size > 1 else ""
        raise HeadstoreError(
            f"{key_name} ({int(key.values[i])}) is after {query_name} ({int(query.values[i])}) in sequence {label}: "
            f"attention from {query_name} cannot reach it{more}"
        )


def check_aligned(a: xr.Dataset, b: xr.Dataset, analyzer: str, keys: tuple[str, ...] = ()) -> None:
    """Refuse pairing stores of different models, or whose prompts do not line up position for position
    (nor sequence for sequence: two partial or subset stores must hold the same ``batch`` labels)."""
    a.hs.provenance.check_same_model(b.hs.provenance)
    selection.check_same_sequences(a, b, analyzer)
    for dim, what in (("batch", "number of sequences"), ("pos", "sequence length")):
        if a.sizes.get(dim) != b.sizes.get(dim):
            raise HeadstoreError(
                f"{analyzer}: the two stores differ in {dim} size ({a.sizes.get(dim)} vs {b.sizes.get(dim)}), "
                f"the {what} of their prompt sets: pair stores made from prompt sets of the same shape "
                "(e.g. --data ioi and ioi-abc with the same --seed and --n-seq)"
            )
    for key in keys:
        if key in a and key in b and not np.array_equal(np.asarray(a[key].values), np.asarray(b[key].values)):
            raise HeadstoreError(
                f"{analyzer}: the two stores' {key} differ, so their prompts are not aligned: "
                "extract both with the same --seed and --n-seq (--data ioi and ioi-abc)"
            )
