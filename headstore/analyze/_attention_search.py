"""``attention_search``: rank every head by the attention that goes from positions matching one predicate to
positions matching another ("which heads attend from `` if`` to ``)``?").

A predicate is a token string (exactly one vocabulary entry, ``ds.hs.token_id``), a token id, a compiled
regular expression (``re.compile(r"^ [A-Z]")``: every token whose string it ``search``-es), or a
:class:`Relation`: ``Relation.ANY`` (every position), and, for the key only, ``Relation.PREVIOUS`` (the
position just before the query) and ``Relation.EARLIER_COPY`` (an earlier position holding the query's token).

With ``M[b, q, k] = 1`` when ``q`` matches the query predicate, ``k`` the key predicate, ``k <= q`` and both are
real tokens (``< length[b]``), and ``Q`` the (b, q) with at least one such ``k``::

    mass[L, h] = sum_{(b, q) in Q} sum_k M[b, q, k] pattern[b, L, h, q, k] / |Q|

``n_queries = |Q|``, ``n_pairs = sum M``; ``rank`` orders the heads by ``mass``, largest first (0), ties to
the earlier (layer, head); a head whose pattern was not stored has NaN mass and rank -1. Streamed one batch
chunk and one stored layer block at a time (sums only).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import xarray as xr

from headstore.analyze._blocks import batch_slices, stream
from headstore.analyze._maths import require, sequence_lengths
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Predicate, Relation
from headstore.store_schema import HeadstoreError, selection

REQUIRES = ("tokens", "pattern")


def _token_ids(ds: xr.Dataset, value: Any, what: str) -> tuple[np.ndarray, str]:
    """A token predicate -> (the vocabulary ids it matches, a description)."""
    if isinstance(value, re.Pattern):
        ids = np.flatnonzero([value.search(s) is not None for s in ds.hs.vocab.tolist()])
        if ids.size == 0:
            raise HeadstoreError(f"{what} regex {value.pattern!r} matches no token of the vocabulary: loosen it")
        return ids, f"regex {value.pattern!r}"
    if isinstance(value, str):
        return np.array([ds.hs.token_id(value)]), repr(value)
    one = selection.scalar(value)
    if one is None or not 0 <= one < ds.hs.config.d_vocab:
        raise HeadstoreError(
            f"{what} must be a token string, a token id in [0, {ds.hs.config.d_vocab}), a re.compile(...) pattern "
            f"or a Relation, got {value!r}"
        )
    return np.array([one]), f"token id {one}"


def _position_mask(ds: xr.Dataset, value: Any, what: str) -> tuple[np.ndarray | None, str]:
    """A token predicate -> (batch, pos) bool of the real positions it matches (None: any position), refused
    in one line when it matches none."""
    if value is Relation.ANY:
        return None, "any position"
    ids, desc = _token_ids(ds, value, what)
    tokens = np.asarray(ds["tokens"].values)
    real = np.arange(tokens.shape[1])[None, :] < selection.lengths(ds)[:, None]
    mask = np.isin(tokens, ids) & real
    if not mask.any():
        raise HeadstoreError(f"{what} {desc} matches no token of this store's sequences: search for a token they hold")
    return mask, desc


def _block(
    start: int,
    pattern: np.ndarray,
    tokens: np.ndarray,
    length: np.ndarray,
    qmask: np.ndarray,
    kmask: np.ndarray,
    relation: str,
) -> tuple[np.ndarray, int, int]:
    """One (batch chunk, layer) block -> (summed mass (l, h), queries with a match, matching pairs)."""
    n_q = pattern.shape[-1]
    q, key = np.arange(n_q)[:, None], np.arange(n_q)[None, :]
    m = (key <= q)[None] & (q < length[:, None, None]) & (key < length[:, None, None]) & qmask[:, :, None]
    if relation == Relation.PREVIOUS.value:
        m &= (key == q - 1)[None]
    elif relation == Relation.EARLIER_COPY.value:
        m &= (tokens[:, None, :] == tokens[:, :, None]) & (key < q)[None]
    else:
        m &= kmask[:, None, :]
    a = np.where(m[:, None, None], pattern.astype(np.float64), 0.0)  # NaN patterns stay NaN where m
    has = m.any(-1)  # b, q
    mass = a.sum(-1)  # b, l, h, q
    return (mass * has[:, None, None]).sum((0, 3)), int(has.sum()), int(m.sum())


def attention_search(ds: xr.Dataset, *, query: Predicate, key: Predicate) -> xr.Dataset:
    """Every head's mean attention mass from query positions matching ``query`` to key positions matching ``key``.

    ``mass[layer, head] = mean over matching queries (b, q) of sum_key M[b, q, key] pattern[b, layer, head, q, key]``
    with ``M`` the pairs ``key <= q`` (real tokens) that match both predicates, over the queries with at least one
    match; ``n_queries`` and ``n_pairs`` count them; ``rank[layer, head]`` 0 for the largest mass. Predicates:
    a token string, a token id, ``re.compile(...)`` over token strings, or a :class:`Relation` (``ANY``; for
    ``key`` also ``PREVIOUS`` and ``EARLIER_COPY``). Computed on call, streaming over the store.
    """
    require(ds, REQUIRES, "attention-search")
    if isinstance(query, Relation) and query is not Relation.ANY:
        raise HeadstoreError(f"query cannot be Relation.{query.name} (a relation to the query): give it as key")
    qmask, qdesc = _position_mask(ds, query, "query")
    relation = key.value if isinstance(key, Relation) and key is not Relation.ANY else ""
    kmask, kdesc = (None, relation) if relation else _position_mask(ds, key, "key")
    n_b, n_p = ds.sizes["batch"], ds.sizes["pos"]
    masks = {
        "qmask": xr.DataArray(np.ones((n_b, n_p), bool) if qmask is None else qmask, dims=("batch", "pos")),
        "kmask": xr.DataArray(np.ones((n_b, n_p), bool) if kmask is None else kmask, dims=("batch", "pos")),
    }
    arrays = {"pattern": ds["pattern"], "tokens": ds["tokens"], "length": sequence_lengths(ds), **masks}
    n_l = ds.sizes["layer"]
    found = stream(_block, arrays, batch_slices(ds), [[i] for i in range(n_l)], relation=relation)
    total = np.zeros((n_l, ds.sizes["head"]))
    n_queries = n_pairs = 0
    for _bs, (i,), (mass, n_q, n_m) in found:
        total[i] += mass[0]
        if i == 0:
            n_queries, n_pairs = n_queries + n_q, n_pairs + n_m
    if n_pairs == 0:
        raise HeadstoreError(
            f"no position matching query {qdesc} has a key matching {kdesc} at or before it: try other predicates"
        )
    return _result(ds, total / n_queries, n_queries, n_pairs, qdesc, kdesc)


def _result(ds: xr.Dataset, mass: np.ndarray, n_queries: int, n_pairs: int, qdesc: str, kdesc: str) -> xr.Dataset:
    flat = mass.ravel()
    order = np.lexsort((np.arange(flat.size), -np.where(np.isfinite(flat), flat, -np.inf)))
    rank = np.full(flat.size, -1, np.int64)
    finite = order[np.isfinite(flat[order])]
    rank[finite] = np.arange(finite.size)
    dims = ("layer", "head")
    out = xr.Dataset(
        {"mass": (dims, mass), "rank": (dims, rank.reshape(mass.shape)), "n_queries": n_queries, "n_pairs": n_pairs},
        coords={"layer": ds.hs.layers, "head": np.arange(ds.sizes["head"])},
    )
    out.attrs.update({"analyzer": "attention-search", "query": qdesc, "key": kdesc})
    return out


SPEC = AnalyzerSpec(
    "attention-search", attention_search, REQUIRES,
    doc="Heads ranked by attention mass from query positions matching one predicate to keys matching another",
    params={"query": Predicate, "key": Predicate},
)  # fmt: skip
register_analyzer(SPEC)
