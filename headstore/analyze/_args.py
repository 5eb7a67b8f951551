"""Checking the Python arguments analyzers take: heads, positions, token ids.

- A head is ``(layer, head)`` with the model's layer number; a set of heads a sequence of them or ``"all"``.
- A position is an ``int`` (the same for every sequence; negative counts back from the end of each
  sequence's real tokens: its ``length`` column when the store has one, else ``seq_len``) or one
  integer per sequence (a list, numpy array or ``xarray.DataArray`` along ``batch``), negatives the same
  way. ``None`` means the store's column of that name.
- A token is an id (``int``) or one id per sequence; strings go through ``ds.hs.token_id`` first.

Everything comes back as plain ints or a loaded ``(batch,)`` int64 DataArray (tiny; used as an indexer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import xarray as xr

from headstore.analyze._maths import sequence_lengths
from headstore.store_schema import HeadstoreError

Head: TypeAlias = tuple[int, int]
Heads: TypeAlias = Sequence[tuple[int, int]] | Literal["all"]
Positions: TypeAlias = int | Sequence[int] | np.ndarray | xr.DataArray
TokenIds: TypeAlias = int | Sequence[int] | np.ndarray | xr.DataArray


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def head(ds: xr.Dataset, value: Any, what: str) -> Head:
    """Check one ``(layer, head)`` against the store."""
    if not (isinstance(value, tuple | list) and len(value) == 2 and all(_is_int(x) for x in value)):
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
    if isinstance(value, tuple) and len(value) == 2 and all(_is_int(x) for x in value):
        raise HeadstoreError(f"{what} is a list of (layer, head) pairs: write [{tuple(value)!r}], not {tuple(value)!r}")
    try:
        items = list(value)
    except TypeError:
        raise HeadstoreError(f"{what} must be 'all' or a list of (layer, head) pairs, got {value!r}") from None
    out = [head(ds, v, what) for v in items]
    if len(set(out)) != len(out):
        raise HeadstoreError(f"{what} names a head twice: {out}")
    return out


def _per_sequence(ds: xr.Dataset, value: Any, what: str) -> np.ndarray:
    n = ds.sizes["batch"]
    if _is_int(value):
        return np.full(n, int(value), np.int64)
    if isinstance(value, xr.DataArray):
        if value.dims != ("batch",):
            raise HeadstoreError(f"{what} must be a DataArray along batch only, got dims {value.dims}")
        value = value.values
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != n or (arr.size and arr.dtype.kind not in "iu"):
        raise HeadstoreError(
            f"{what} must be an int or {n} integers (one per sequence), got {arr.dtype} of shape {arr.shape}"
        )
    return arr.astype(np.int64)


def lengths(ds: xr.Dataset) -> np.ndarray:
    """(batch,) real tokens per sequence, loaded (``_maths.sequence_lengths``)."""
    return np.asarray(sequence_lengths(ds).values, dtype=np.int64)


def _or_column(ds: xr.Dataset, value: Any, what: str, column: str | None, hint: str) -> Any:
    """``value``, or the store's ``column`` when ``value`` is None (refused, naming both, when absent)."""
    if value is not None:
        return value
    if column is None or column not in ds:
        raise HeadstoreError(f"{what} was not given and this store has no {column!r} column: pass {what}= ({hint})")
    return np.asarray(ds[column].values)


def positions(ds: xr.Dataset, value: Any, what: str, column: str | None = None) -> xr.DataArray:
    """A position argument (see the module docstring) -> (batch,) int64 positions inside each sequence."""
    value = _or_column(ds, value, what, column, "an int, or one position per sequence")
    pos = _per_sequence(ds, value, what)
    length = lengths(ds)
    pos = np.where(pos < 0, length + pos, pos)
    bad = np.flatnonzero((pos < 0) | (pos >= length))
    if bad.size:
        i = int(bad[0])
        raise HeadstoreError(
            f"{what} is outside sequence {i}: position {int(pos[i])} of its {int(length[i])} tokens "
            f"({bad.size} sequence(s) out of range)"
        )
    return xr.DataArray(pos, dims="batch")


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
    if not _is_int(value) or not 0 <= int(value) < ds.hs.config.d_vocab:
        raise HeadstoreError(
            f"{what} must be a token id in [0, {ds.hs.config.d_vocab}) or a token string, got {value!r}"
        )
    return int(value)


def check_aligned(a: xr.Dataset, b: xr.Dataset, analyzer: str, keys: tuple[str, ...] = ()) -> None:
    """Refuse pairing stores of different models, or whose prompts do not line up position for position."""
    a.hs.provenance.check_same_model(b.hs.provenance)
    for dim in ("batch", "pos"):
        if a.sizes.get(dim) != b.sizes.get(dim):
            raise HeadstoreError(
                f"{analyzer}: the two stores differ in {dim} size ({a.sizes.get(dim)} vs {b.sizes.get(dim)}): "
                "extract both with the same --seed and --n-seq"
            )
    for key in keys:
        if key in a and key in b and not np.array_equal(np.asarray(a[key].values), np.asarray(b[key].values)):
            raise HeadstoreError(
                f"{analyzer}: the two stores' {key} differ, so their prompts are not aligned: "
                "extract both with the same --seed and --n-seq (--data ioi and ioi-abc)"
            )
