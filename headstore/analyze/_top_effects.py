"""``top_effects``: each head's (sequence, position) pairs with the largest and the most negative direct effect.

A head's direct effect at query position ``q`` is what it writes into the residual stream there, read by the
final norm with its scale frozen, on one logit (``_maths.head_writes``: ``W_write = W_O``, times the
post-attention norm's gain on post-norm models, ``inv_post`` that norm's inverse scale, else 1). With
``u(t) = W_U[:, t]`` (centred over ``d_model`` on LN models, ``_maths.logit_direction``):

- ``by="next"``: on the logit of the actual next token,
  ``effect[b, L, h, q] = (z[b, L, q, h] @ W_write[L, h]) . u(tokens[b, q + 1]) * inv_post[b, L, q] / ln_final_scale[b, q]``,
  over the positions that have a real next token (``q + 1 < length[b]``);
- ``by="attended"``: on the logits of the tokens it attends to (copy suppression), source by source,
  ``effect[b, L, h, q] = sum_k a[b, L, h, q, k] coef[b, L, h, k] * inv_post[b, L, q] / ln_final_scale[b, q]``
  with ``coef[b, L, h, k] = (v[b, L, k, kv(h)] @ W_write[L, h]) . u(tokens[b, k])`` and ``a = pattern`` on real,
  non-BOS keys (copy suppression's ``per_position`` is ``sum_q`` of these terms), over real queries.

Both orders are kept (``order = largest, most_negative``); ties go to the earlier sequence, then position.
Streamed one batch chunk and one stored layer block at a time. The logit is the pre-soft-cap one on soft-capped models.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._blocks import batch_slices, masked, merge_into, stream, token_strings, tokens_at, top_k_rows
from headstore.analyze._maths import (
    _take_columns,
    bos_id,
    f32,
    head_writes,
    kv_index,
    logits_kind,
    require,
    sequence_lengths,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Heads, TopEffectsBy
from headstore.store_schema import HeadstoreError, selection

BY = ("next", "attended")
NEEDS = {
    "next": ("tokens", "z", "ln_final_scale", "W_O", "W_U"),
    "attended": ("tokens", "v", "pattern", "ln_final_scale", "W_O", "W_U"),
}
REQUIRES = NEEDS["next"]  # the default, by="next"
ORDERS = ("largest", "most_negative")


def _directions(tokens: np.ndarray, w_u: np.ndarray, centre: bool) -> np.ndarray:
    """(b, pos, d_model) ``u(tokens)``, centred over d_model when ``centre`` (LN); -1 tokens give zeros."""
    u = _take_columns(np.maximum(tokens, 0), w_u)
    if centre:
        u = u - u.mean(-1, keepdims=True)
    return np.where((tokens >= 0)[..., None], u, np.float32(0))


def _effects(
    tokens: np.ndarray, length: np.ndarray, w_write: np.ndarray, w_u: np.ndarray, inv: np.ndarray, centre: bool,
    by: str, z: np.ndarray | None, v: np.ndarray | None, pattern: np.ndarray | None, kv: np.ndarray, bos: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One block -> (effect (b, l, h, q), valid (b, q)) by the module docstring; ``inv`` (b, l, q)."""
    pos = np.arange(tokens.shape[1])
    real = pos[None, :] < length[:, None]
    if by == "next":
        nxt = np.where(pos[None, :] + 1 < length[:, None], np.roll(tokens, -1, axis=1), -1)
        u = _directions(nxt, w_u, centre)  # b, q, m
        assert z is not None
        zw = np.einsum("blqhd,lhdm->blhqm", z.astype(np.float32), w_write, optimize=True)
        return (zw * u[:, None, None]).sum(-1) * inv[:, :, None, :], nxt >= 0
    assert v is not None and pattern is not None
    u = _directions(tokens, w_u, centre)  # b, k, m
    vw = np.einsum("blkhd,lhdm->blhkm", v[:, :, :, kv].astype(np.float32), w_write, optimize=True)
    coef = (vw * u[:, None, None]).sum(-1)  # b, l, h, k
    keep = real & (tokens != bos) if bos >= 0 else real
    a = np.where(keep[:, None, None, None, :], pattern.astype(np.float32), np.float32(0))
    return np.einsum("blhqk,blhk->blhq", a, coef) * inv[:, :, None, :], real


def _block(
    start: int, tokens: np.ndarray, length: np.ndarray, w_write: np.ndarray, w_u: np.ndarray, inv: np.ndarray,
    k: int, centre: bool, by: str, kv: np.ndarray, bos: int, z: np.ndarray | None = None,
    v: np.ndarray | None = None, pattern: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One (batch chunk, layer) block -> (effects (order, l, h, k), where (order, l, h, k, 2): row, position)."""
    effect, valid = _effects(tokens, length, w_write, w_u, inv, centre, by, z, v, pattern, kv, bos)
    n_b, n_l, n_h, n_q = effect.shape
    vals = masked(effect.transpose(1, 2, 0, 3), valid[None, None]).reshape(n_l * n_h, -1)
    neg = masked(-effect.transpose(1, 2, 0, 3), valid[None, None]).reshape(n_l * n_h, -1)
    out_v, out_at = [], []
    for sign, x in ((1.0, vals), (-1.0, neg)):
        idx = top_k_rows(x, k)
        got = np.where(idx >= 0, np.take_along_axis(x, np.maximum(idx, 0), 1) * sign, np.nan)
        b, q = np.unravel_index(np.maximum(idx, 0), (n_b, n_q))
        out_v.append(got.reshape(n_l, n_h, k))
        out_at.append(np.stack([b + start, q], -1).reshape(n_l, n_h, k, 2))
    return np.stack(out_v), np.stack(out_at)


def top_effects(ds: xr.Dataset, *, heads: Heads = "all", k: int = 20, by: TopEffectsBy = "next") -> xr.Dataset:
    """Each head's ``k`` (sequence, position) pairs with the largest and the most negative direct effect.

    ``effect[layer, head, order, rank]``: ``by="next"`` the head's direct effect at ``pos`` on the logit of the
    next token, ``(z[b, layer, pos, head] @ W_O[layer, head]) . W_U[:, tokens[b, pos + 1]] / ln_final_scale[b, pos]``;
    ``by="attended"`` its effect on the logits of the tokens it attends to, ``sum_key pattern[b, layer, head, pos,
    key] * (v[b, layer, key, kv(head)] @ W_O[layer, head]) . W_U[:, tokens[b, key]] / ln_final_scale[b, pos]`` (BOS
    and padded keys left out); post-norm models through their frozen post-attention norm (module docstring).
    ``order`` is ``largest`` (largest first) or ``most_negative`` (most negative first); ties go to the earlier
    sequence, then position. Also ``sequence`` (``batch`` label), ``pos``, ``token`` / ``token_str`` (the token at
    ``pos``) and ``target`` / ``target_str`` (the next token for ``"next"``; -1 / '' for ``"attended"``).
    Computed on call, streaming one batch chunk and one stored layer block at a time.
    """
    if by not in BY:
        raise HeadstoreError(f"by must be 'next' or 'attended', got {by!r}")
    require(ds, NEEDS[by], "top-effects")
    chosen = _args.heads(ds, heads, "heads")
    if not selection.is_int(k) or int(k) < 1:
        raise HeadstoreError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    w_write, inv_post = head_writes(ds, "top-effects")
    inv = 1.0 / f32(ds["ln_final_scale"])
    inv = inv * inv_post if inv_post is not None else inv.expand_dims(layer=ds["layer"])
    arrays = {
        "tokens": ds["tokens"], "length": sequence_lengths(ds), "w_write": w_write.transpose("layer", "head", "d_head", "d_model"),
        "w_u": f32(ds["W_U"]).transpose("d_model", "d_vocab"), "inv": inv.transpose("batch", "layer", "pos"),
        **({"z": ds["z"]} if by == "next" else {"v": ds["v"], "pattern": ds["pattern"]}),
    }  # fmt: skip
    layers = sorted({ds.hs.layers.index(L) for L, _ in chosen})
    bos = bos_id(ds)
    n_l, n_h = ds.sizes["layer"], ds.sizes["head"]
    effect = np.full((n_l, n_h, 2, k), np.nan)  # float64 while merging, as the blocks' candidates
    where = np.full((n_l, n_h, 2, k, 2), -1, np.int64)
    for _bs, (i,), (vals, at) in stream(
        _block, arrays, batch_slices(ds), [[i] for i in layers], k=k, by=by,
        centre=ds.hs.config.normalization_type == "LN", kv=kv_index(ds).values, bos=-1 if bos is None else bos,
    ):  # fmt: skip
        for o, sign in enumerate((1.0, -1.0)):  # the best k so far merged with this block's k (signed: larger first)
            best, where[i, :, o] = merge_into(effect[i, :, o] * sign, where[i, :, o], vals[o, 0] * sign, at[o, 0], k)
            effect[i, :, o] = best * sign
    keep = np.zeros((n_l, n_h), bool)
    for L, h in chosen:
        keep[ds.hs.layers.index(L), h] = True
    effect[~keep], where[~keep] = np.nan, -1
    return _result(ds, effect.astype(np.float32), where, heads, k, by)


def _result(ds: xr.Dataset, effect: np.ndarray, where: np.ndarray, heads: object, k: int, by: str) -> xr.Dataset:
    row, pos = where[..., 0], where[..., 1]
    ok = row >= 0
    token = tokens_at(ds, row, pos)
    if by == "next":
        target = tokens_at(ds, row, np.where(ok, pos + 1, -1))
    else:
        target = np.full(row.shape, -1, np.int64)
    dims = ("layer", "head", "order", "rank")
    out = xr.Dataset(
        {
            "effect": (dims, effect),
            "sequence": (dims, np.where(ok, selection.labels(ds)[np.maximum(row, 0)], -1).astype(np.int64)),
            "pos": (dims, pos),
            "token": (dims, token),
            "token_str": (dims, token_strings(ds, token)),
            "target": (dims, target),
            "target_str": (dims, token_strings(ds, target)),
        },
        coords={"layer": ds.hs.layers, "head": np.arange(ds.sizes["head"]), "order": list(ORDERS),
                "rank": np.arange(k)},
    )  # fmt: skip
    out.attrs.update(
        {"analyzer": "top-effects", "k": k, "by": by, "heads": heads if isinstance(heads, str) else "selected",
         "logits": logits_kind(ds)}
    )  # fmt: skip
    return out


SPEC = AnalyzerSpec(
    "top-effects", top_effects, REQUIRES,
    doc="Each head's (sequence, position) pairs with the largest and most negative direct effect on a logit",
    params={"heads": Heads, "k": int, "by": TopEffectsBy},
)  # fmt: skip
register_analyzer(SPEC)
