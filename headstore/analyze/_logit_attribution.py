"""Per-head, per-source decomposition of one logit (seed 002: ``pattern[:, -1] * C_OV[..., else, :]``).

For a destination position ``dest`` and a target token ``t`` (per sequence ``b``), head ``(L, h)``
contributes through source position ``k``::

    contrib[b, L, h, k] = pattern[b, L, h, dest, k] * (v[b, L, k, kv(h)] @ W_O[L, h] @ u) / ln_final_scale[b, dest]

with ``u = W_U[:, t]`` on RMSNorm models and ``u = W_U[:, t] - mean_d_model(W_U[:, t])`` on LayerNorm
models: ln_final with its scale frozen is the linear map ``x -> (x - mean(x)) / scale``, and
``(x - mean x) . w = x . (w - mean w)``, so every term (heads and the rest) is projected through
exactly the map that makes the logit. ``center_unembed`` centres ``W_U`` over the *vocabulary*; it
is ``fold_ln`` (folding ln_final into ``W_U``) that centres it over ``d_model``, so on stores made by
headstore this centring is a no-op, but the decomposition does not rely on it (and with
``center_writing_weights`` every head output has zero mean over ``d_model`` as well).

The seed's own check was "very far off" because it used an unfolded model, ln_final of each
source's OV output separately and no frozen scale; here the decomposition is exact:

- ``per_head = contrib.sum(key_pos)`` equals ``per_head_from_result``, the head's own output
  ``result[b, L, dest, h]`` projected the same way (attention rows sum to 1);
- value biases: the model is loaded with ``fold_value_biases`` so the stored ``b_V`` is zero (the
  bias lives in ``b_O``). Should a store carry a non-zero ``b_V``, it is folded here: ``v - b_V`` is
  attributed to the sources and ``b_V @ W_O`` goes to ``residual_other`` (``attrs["b_V_folded"]``
  says whether the store was already folded);
- ``logit = normalize(resid_final[b, dest]) @ W_U[:, t] + b_U[t]`` (``_ops.normalize_final``);
  ``residual_other`` is everything in the residual stream that is not an extracted head's output
  (embeddings, MLPs, ``b_O``, heads of layers not extracted), computed *independently* as
  ``normalize(resid_final - sum_heads result) @ W_U[:, t]``; ``reconstruction_error =
  logit - (sum_heads per_head + residual_other + b_U[t])`` is ~0 (float32 rounding).

``target``: a token id, ``"next"`` (the true next token ``tokens[b, dest+1]``), or one id per sequence
(e.g. ``ds["io_token"]`` on IOI stores; ``ds.hs.token_id(" Mary")`` turns a string into an id).

Soft-capped models (Gemma-2): ``logit`` is the pre-cap logit ``normalize(resid_final) @ W_U[:, t] + b_U[t]``,
the model's being ``c * tanh(logit / c)``; the decomposition is of the pre-cap logit (linear), and
``attrs["logits"]`` says so. Post-norm models (Gemma-2, OLMo-2): each head adds its output through its layer's
post-attention norm, frozen (``ln1_post_w / ln1_post_scale``, ``_maths.head_writes``), in ``contrib``,
``per_head_from_result`` and ``residual_other`` alike, so the decomposition stays exact.

``dest``: a position (negative counts back from the end of each sequence's real tokens) or one per
sequence. None (default): the store's ``end_pos`` column when it has one (IOI: the last prompt token),
else the last real token, or with ``target="next"`` the last one that has a next token. A ``dest``
with no next token under ``"next"`` is an error. On IOI stores the token after ``end_pos`` is padding,
so ask for ``target=ds["io_token"]`` there.

Output: ``contrib (layer, head, batch, key_pos)``, ``per_head`` (``sum_k contrib``), ``per_head_from_result``,
``logit``, ``residual_other``, ``b_U_term``, ``reconstruction_error`` (batch), ``dest``, ``target``, ``key_token
(batch, key_pos)`` and, when the store has its vocabulary, ``key_token_str (batch, key_pos)`` (each sequence's own
tokens) and ``target_str (batch)``. ``attrs["target"]``, ``attrs["dest"]``: the value given when it is one
integer (numpy integers included), else ``"per-sequence"`` (``"default"`` for ``dest=None``).

Layers whose ``pattern`` was not stored (``extract --pattern-layers``) have NaN ``contrib`` and ``per_head``
(never 0, which would read as "no effect"), and so NaN ``reconstruction_error``; ``per_head_from_result`` reads
``result`` and stays finite there.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import (
    f32,
    head_writes,
    logit_direction,
    logits_kind,
    normalize_final,
    per_head,
    require,
    source_contributions,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Positions, TokenIds
from headstore.store_schema import HeadstoreError

REQUIRES = ("tokens", "pattern", "v", "result", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U", "b_V")


def _dest(ds: xr.Dataset, dest: _args.Positions | None, next_token: bool) -> xr.DataArray:
    if dest is None:
        if "end_pos" in ds:
            return _args.positions(ds, None, "dest", column="end_pos")
        dest = -2 if next_token else -1
    return _args.positions(ds, dest, "dest")


def _target(ds: xr.Dataset, target: object, dest: xr.DataArray) -> xr.DataArray:
    if not (isinstance(target, str) and target == "next"):
        return _args.token_ids(ds, target, "target")
    after = dest.values + 1
    bad = np.flatnonzero(after >= _args.lengths(ds))
    if bad.size:
        raise HeadstoreError(
            f"target 'next' needs a token after dest, but sequences {bad[:5].tolist()} have dest at their last token: "
            "pass a smaller dest, or target ids (e.g. target=ds['io_token'])"
        )
    toks = np.asarray(ds["tokens"].values)
    return xr.DataArray(toks[np.arange(toks.shape[0]), after].astype(np.int64), dims="batch")


def _or_per_sequence(value: int | None) -> int | str:
    return "per-sequence" if value is None else value


def logit_attribution(
    ds: xr.Dataset,
    *,
    target: int | Literal["next"] | _args.TokenIds = "next",
    dest: _args.Positions | None = None,
) -> xr.Dataset:
    """Decompose the target logit at ``dest`` into (head, source position) terms plus the rest (module docstring)."""
    require(ds, REQUIRES, "logit-attribution")
    dest_da = _dest(ds, dest, isinstance(target, str) and target == "next")
    tgt_da = _target(ds, target, dest_da)

    u = f32(ds["W_U"]).isel(d_vocab=tgt_da)  # (d_model, batch)
    u_c = logit_direction(ds, tgt_da)
    inv = 1.0 / f32(ds["ln_final_scale"]).isel(pos=dest_da)  # (batch,)
    contrib = source_contributions(ds, dest_da, tgt_da)
    per = contrib.sum("key_pos", skipna=False)  # NaN where the pattern was not stored (--pattern-layers), never 0

    bvo = xr.dot(f32(per_head(ds["b_V"], ds)), f32(ds["W_O"]), dim="d_head")  # (layer, head, d_model)
    res_dest = f32(ds["result"]).isel(pos=dest_da) - bvo  # (batch, layer, head, d_model)
    _, inv_post = head_writes(ds, "logit-attribution")
    if inv_post is not None:  # post-norm: what the head adds, through its layer's frozen post-attention norm
        res_dest = res_dest * f32(ds["ln1_post_w"]) * inv_post.isel(pos=dest_da)
    from_result = (xr.dot(res_dest, u_c, dim="d_model", optimize=True) * inv).transpose("batch", "layer", "head")
    resid = f32(ds["resid_final"]).isel(pos=dest_da)  # (batch, d_model)
    scale = f32(ds["ln_final_scale"]).isel(pos=dest_da)
    b_U = f32(ds["b_U"]).isel(d_vocab=tgt_da)
    logit = xr.dot(normalize_final(resid, scale, ds.hs.config), u, dim="d_model", optimize=True) + b_U
    other = xr.dot(resid - res_dest.sum(["layer", "head"]), u_c, dim="d_model", optimize=True) * inv
    recon = logit - (per.sum(["layer", "head"], skipna=False) + other + b_U)

    b_V_zero = bool((np.asarray(ds["b_V"].values) == 0).all())
    out = xr.Dataset(
        {
            "contrib": contrib.transpose("layer", "head", "batch", "key_pos"),
            "per_head": per.transpose("layer", "head", "batch"),
            "per_head_from_result": from_result.transpose("layer", "head", "batch"),
            "logit": logit,
            "residual_other": other,
            "b_U_term": b_U,
            "reconstruction_error": recon,
            "dest": dest_da,
            "target": tgt_da,
            "key_token": ds["tokens"].rename(pos="key_pos").astype(np.int64),
        },
        coords={"layer": ds["layer"].values},
    )
    out = out.drop_vars([c for c in ("d_vocab", "pos", "query_pos") if c in out.coords])
    if "vocab" in ds:
        vocab = ds.hs.vocab.astype(object)  # references to the vocabulary's strings, not a fixed-width copy each
        tokens = ds["tokens"].transpose("batch", "pos")
        out["key_token_str"] = xr.DataArray(vocab[np.asarray(tokens.values)], dims=("batch", "key_pos"))
        out["target_str"] = xr.DataArray(vocab[tgt_da.values], dims="batch")
    out.attrs.update(
        {
            "analyzer": "logit-attribution",
            "target": target if isinstance(target, str) else _or_per_sequence(_args.scalar(target)),
            "dest": "default" if dest is None else _or_per_sequence(_args.scalar(dest)),
            "b_V_folded": int(b_V_zero),
            "logits": logits_kind(ds),
        }
    )
    return out


SPEC = AnalyzerSpec(
    "logit-attribution",
    logit_attribution,
    REQUIRES,
    doc="Per-head, per-source decomposition of a target logit at a destination position (seed 002).",
    params={"target": TokenIds, "dest": Positions},
)
register_analyzer(SPEC)
