"""Why a head attends: its pre-softmax score at (query, key) decomposed over the residual stream's parts.

The query/key decomposition of the copy-suppression paper (McDougall et al. 2023, section 10.7's figure of
what drives head 10.7's query and key), from the store alone. Head ``(L, h)`` reads at position ``p`` the
residual ``resid_pre[b, L, p]``, which is exactly the sum of its components ``c_i(p)``:

    embed          resid_pre[b, 0, p] - W_pos[p]           (the token embedding as the residual receives it)
    pos_embed      W_pos[p]                                 (models with learned positions only)
    a{L'}.h{H}     result[b, L', p, H] * g[L'] / s_post[b, L', p]       for every L' < L, every head H
    a{L'}.b_O      b_O[L'] * g[L'] / s_post[b, L', p]                   (value biases folded in at extraction)
    m{L'}          resid_pre[b, L'+1, p] - resid_pre[b, L', p] - sum_H a{L'}.h{H} - a{L'}.b_O    (derived MLP)

with ``g / s_post`` the frozen post-attention norm (``ln1_post_w / ln1_post_scale``: Gemma-2, OLMo-2; 1
elsewhere). With ln1's scale ``s = ln1_scale[b, L, p]`` frozen (and LayerNorm's centring applied to each
component, being linear), the query and key are linear in the components, so every component gets its share

    Q_i[b, d_head] = rot_q(n_q * ((c_i(q) - mean_d_model c_i(q)) / s(q)) @ W_Q[L, h])      plus Q_b_Q = rot_q(n_q * b_Q[L, h])
    K_j[b, d_head] = rot_k(n_k * ((c_j(k) - mean_d_model c_j(k)) / s(k)) @ W_K[L, kv(h)])  plus K_b_K = rot_k(n_k * b_K[L, kv(h)])
    terms[b, q_component=i, k_component=j] = Q_i . K_j * scale
    score[b] = (sum_i Q_i) . (sum_j K_j) * scale = sum_ij terms[b, i, j]

where ``W_Q``, ``W_K`` are the processed weights (ln1's gain folded in), ``rot`` the stored rotary tables at
the query (key) position (rotary models; partial and interleaved as the model), ``scale`` the model's score
scale (``1/sqrt(d_head)``, Gemma-2's ``query_pre_attn_scalar ** -0.5``) and ``n_q``, ``n_k`` the q/k norms
frozen in turn (Qwen3 per head, OLMo-2 over every head: ``q_norm_w / sqrt(mean q_pre^2 + eps)``, its scale
recomputed from the stored ``resid_pre``; 1 on other models). Models without ln1 (OLMo-2) read the residual
raw. The terms sum exactly (up to float rounding: ``reconstruction_error``) to ``score``, which is computed
from the undecomposed residual. On models with an attention soft-cap (Gemma-2) the decomposed score is the
pre-cap one, the model's being ``c * tanh(score / c)``: ``attrs["scores"]`` says so.

Pairs are ranked by ``|mean over sequences of terms[b, i, j]|`` (largest first): the pairs that move the score
the same way across sequences; ``top_term`` holds that signed mean. The norms are frozen (not
differentiated through), as the paper's decomposition does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import f32, require, rotate
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Head, Positions
from headstore.store_schema import HeadstoreError, selection

NAME = "attention-attribution"
NEEDS = ("resid_pre", "result", "W_Q", "W_K", "b_Q", "b_K", "b_O")
REQUIRES = ("resid_pre", "z", "W_Q", "W_K", "b_Q", "b_K", "b_O")  # result derives from z; per family: _needs
Side = tuple[str, str, str, str]  # (weight, bias, q/k-norm gain, head dim) of the query or key side
QUERY: Side = ("W_Q", "b_Q", "q_norm_w", "head")
KEY: Side = ("W_K", "b_K", "k_norm_w", "kv_head")


def _needs(ds: xr.Dataset) -> tuple[str, ...]:
    cfg = ds.hs.config
    rotary = cfg.positional_embedding_type == "rotary"
    return (
        *NEEDS,
        *(("ln1_scale",) if cfg.pre_norm else ()),
        *(("rotary_cos", "rotary_sin") if rotary else ("W_pos",) if "W_pos" in ds else ()),
        *(("q_norm_w", "k_norm_w") if cfg.qk_norm else ()),
        *(("ln1_post_scale", "ln1_post_w") if cfg.post_norm else ()),
    )


def _named(da: xr.DataArray, names: list[str]) -> xr.DataArray:
    """``da`` with a leading ``component`` dim of these names (one name: a new dim), scalar coords dropped."""
    if "component" not in da.dims:
        da = da.expand_dims(component=1)
    da = da.drop_vars([c for c in da.coords if c not in ("batch",)])
    return da.assign_coords(component=names)


def components(ds: xr.Dataset, layer: int, pos: xr.DataArray) -> xr.DataArray:
    """(batch, component, d_model) the parts of ``resid_pre[b, layer, pos[b]]`` (module docstring), in the order
    the residual stream receives them; they sum to it exactly."""
    cfg = ds.hs.config
    resid = f32(ds["resid_pre"]).sel(layer=list(range(layer + 1))).isel(pos=pos)  # (batch, layer, d_model)
    embed = resid.sel(layer=0)
    pieces = [_named(embed, ["embed"])]
    if "W_pos" in ds and cfg.positional_embedding_type != "rotary":
        pos_embed = f32(ds["W_pos"]).isel(n_ctx=pos)
        pieces = [_named(embed - pos_embed, ["embed"]), _named(pos_embed, ["pos_embed"])]
    if layer > 0:
        pieces.append(_writes(ds, resid, pos))
    out = xr.concat(pieces, dim="component", join="override", coords="minimal", compat="override").transpose(
        "batch", "component", "d_model"
    )
    return out.chunk({"component": -1}) if out.chunks is not None else out


def _writes(ds: xr.Dataset, resid: xr.DataArray, pos: xr.DataArray) -> xr.DataArray:
    """(batch, component, d_model) what each layer before ``resid``'s (batch, layer, d_model) last writes, layer by
    layer: ``a{L}.h0 .. a{L}.h{H-1}, a{L}.b_O, m{L}``, built at once over ``layer`` and flattened::

        m{L}[b] = resid[b, L+1] - resid[b, L] - (sum_head a{L}.h[b, head] + a{L}.b_O[b])
    """
    earlier = [int(L) for L in resid["layer"].values[:-1]]
    result = f32(ds["result"]).sel(layer=earlier).isel(pos=pos)  # (batch, layer, head, d_model)
    b_o = f32(ds["b_O"]).sel(layer=earlier) + xr.zeros_like(resid.sel(layer=earlier))  # (batch, layer, d_model)
    if ds.hs.config.post_norm:  # each layer's write passes its frozen post-attention norm
        post = f32(ds["ln1_post_w"]).sel(layer=earlier) / f32(ds["ln1_post_scale"]).sel(layer=earlier).isel(pos=pos)
        result, b_o = result * post, b_o * post
    nxt = resid.isel(layer=slice(1, None)).assign_coords(layer=earlier)
    mlp = nxt - resid.sel(layer=earlier) - (result.sum("head") + b_o)
    slots = xr.concat(
        [result.drop_vars("head", errors="ignore").rename(head="slot"), b_o.expand_dims(slot=1), mlp.expand_dims(slot=1)],
        dim="slot", join="override", coords="minimal", compat="override",
    )  # fmt: skip
    flat = slots.stack(component=("layer", "slot"), create_index=False)  # layer-major: each layer's slots in turn
    heads = range(ds.hs.config.n_heads)
    names = [n for L in earlier for n in (*(f"a{L}.h{h}" for h in heads), f"a{L}.b_O", f"m{L}")]
    return _named(flat.transpose("batch", "component", "d_model"), names)


def _normalize(x: xr.DataArray, ds: xr.Dataset, scale: xr.DataArray | None) -> xr.DataArray:
    """ln1 with its stored scale frozen: ``(x - mean x) / s`` (LN, each component centred) or ``x / s`` (RMS);
    ``x`` itself on models without ln1."""
    if scale is None:
        return x
    if ds.hs.config.normalization_type == "LN":
        x = x - x.mean("d_model")
    return x / scale


def _qk_norm(ds: xr.Dataset, x: xr.DataArray, layer: int, idx: int, side: Side) -> xr.DataArray | None:
    """(batch, d_head) the q/k norm's frozen factor ``gain / sqrt(mean y^2 + eps)`` for the whole query (key)
    ``y = x @ W + b`` of the read residual ``x`` (batch, d_model), or None on models without q/k norms."""
    cfg = ds.hs.config
    weight, bias, gain, dim = side
    if not cfg.qk_norm:
        return None
    y = xr.dot(x, f32(ds[weight].sel(layer=layer)), dim="d_model", optimize=True) + f32(ds[bias].sel(layer=layer))
    if cfg.qk_norm == "full":  # OLMo-2: one norm over every head's query (key)
        factor = 1.0 / np.sqrt((y * y).mean([dim, "d_head"]) + np.float32(cfg.eps))
    else:
        factor = 1.0 / np.sqrt((y.isel({dim: idx}) ** 2).mean("d_head") + np.float32(cfg.eps))
    return (factor * f32(ds[gain].sel(layer=layer).isel({dim: idx}))).drop_vars(
        [c for c in ("layer", "head") if c in ds[gain].coords], errors="ignore"
    )


def _norm_and_rotate(ds: xr.Dataset, y: xr.DataArray, factor: xr.DataArray | None,
                     pos: xr.DataArray) -> xr.DataArray:  # fmt: skip
    """``rot(factor * y)``: the frozen q/k norm (None: none), then the rotary at ``pos[b]`` (rotary models)."""
    if factor is not None:
        y = y * factor
    if "rotary_cos" not in ds:
        return y
    return rotate(y, ds["rotary_cos"].isel(pos=pos), ds["rotary_sin"].isel(pos=pos), ds.hs.config.rotary_style)


def side_shares(ds: xr.Dataset, layer: int, idx: int, pos: xr.DataArray, side: Side) -> xr.DataArray:
    """(batch, component, d_head) each component's share of head ``idx``'s query (``QUERY``) or kv head ``idx``'s
    key (``KEY``) at ``pos[b]``, after the frozen norms and the rotary; the last component is the bias
    (``b_Q`` / ``b_K``). The shares sum to the model's (post-rotary) query or key."""
    cfg = ds.hs.config
    weight, bias, _, dim = side
    scale = f32(ds["ln1_scale"]).sel(layer=layer).isel(pos=pos) if cfg.pre_norm else None
    comps = components(ds, layer, pos)
    x = _normalize(comps, ds, scale)
    w = f32(ds[weight].sel(layer=layer).isel({dim: idx}))
    b = f32(ds[bias].sel(layer=layer).isel({dim: idx}))
    shares = xr.concat(
        [xr.dot(x, w, dim="d_model", optimize=True).drop_vars([dim, "layer"], errors="ignore"), _named(b, [bias])],
        dim="component", join="override", coords="minimal", compat="override",
    )  # fmt: skip
    shares = _norm_and_rotate(ds, shares, _qk_norm(ds, x.sum("component"), layer, idx, side), pos)
    shares = shares.transpose("batch", "component", "d_head")
    return shares.chunk({"component": -1}) if shares.chunks is not None else shares


def _whole(ds: xr.Dataset, layer: int, idx: int, pos: xr.DataArray, side: Side) -> xr.DataArray:
    """(batch, d_head) the query (key) read from the undecomposed ``resid_pre[b, layer, pos[b]]``, the same way."""
    cfg = ds.hs.config
    weight, bias, _, dim = side
    scale = f32(ds["ln1_scale"]).sel(layer=layer).isel(pos=pos) if cfg.pre_norm else None
    x = _normalize(f32(ds["resid_pre"]).sel(layer=layer).isel(pos=pos), ds, scale)
    y = xr.dot(x, f32(ds[weight].sel(layer=layer).isel({dim: idx})), dim="d_model")
    y = y + f32(ds[bias].sel(layer=layer).isel({dim: idx}))
    y = _norm_and_rotate(ds, y, _qk_norm(ds, x, layer, idx, side), pos)
    return y.drop_vars([c for c in y.coords if c != "batch"])


def _top(mean: np.ndarray, k: int, q_names: np.ndarray, k_names: np.ndarray) -> tuple[np.ndarray, ...]:
    """numpy: the ``k`` (q, k) pairs of largest ``|mean|``, largest first (ties: the earlier pair)."""
    flat = mean.reshape(-1)
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    n_k = mean.shape[-1]
    return q_names[order // n_k], k_names[order % n_k], flat[order].astype(np.float32)


def top_pairs(mean: xr.DataArray, k: int) -> xr.Dataset:
    """``top_q_component``, ``top_k_component``, ``top_term`` along ``rank``: the ``k`` pairs of ``mean``
    (q_component, k_component) of largest absolute value, largest first. Lazy on dask input."""
    q_names = np.asarray(mean["q_component"].values, dtype=str)
    k_names = np.asarray(mean["k_component"].values, dtype=str)
    k = min(k, q_names.size * k_names.size)
    if mean.chunks is not None:
        mean = mean.chunk({"q_component": -1, "k_component": -1})
    out = xr.apply_ufunc(
        _top, mean.drop_vars(["q_component", "k_component"]), kwargs={"k": k, "q_names": q_names, "k_names": k_names},
        input_core_dims=[["q_component", "k_component"]], output_core_dims=[["rank"]] * 3,
        dask="parallelized", output_dtypes=[q_names.dtype, k_names.dtype, np.float32],
        dask_gufunc_kwargs={"output_sizes": {"rank": k}},
    )  # fmt: skip
    return xr.Dataset({"top_q_component": out[0], "top_k_component": out[1], "top_term": out[2]})


def _check(ds: xr.Dataset, head: Any, query_pos: Any, key_pos: Any, top_k: Any) -> tuple[Any, ...]:
    """Checked arguments: ``(layer, head, query positions, key positions, top_k)``."""
    require(ds, _needs(ds), NAME)
    layer, h = _args.head(ds, head, "head")
    missing = [L for L in range(layer + 1) if L not in ds.hs.layers]
    if missing:
        raise HeadstoreError(
            f"{NAME}: head ({layer}, {h}) reads every earlier layer's output, and this store lacks layers {missing}: "
            f"extract with --layers 0-{layer} (or all)"
        )
    k = _args.scalar(top_k)
    if k is None or k < 1:
        raise HeadstoreError(f"top_k must be a positive int, got {top_k!r}")
    q_pos = _args.positions(ds, query_pos, "query_pos", column="end_pos")
    k_pos = _args.positions(ds, key_pos, "key_pos", column="io_pos")
    _args.check_causal(ds, k_pos, "key_pos", q_pos, "query_pos")
    window = ds.hs.config.window(layer)
    outside = np.flatnonzero(k_pos.values <= q_pos.values - window) if window else np.array([], int)
    if outside.size:
        i = int(outside[0])
        raise HeadstoreError(
            f"key_pos ({int(k_pos.values[i])}) is outside layer {layer}'s sliding window of {window} from query_pos "
            f"({int(q_pos.values[i])}) in sequence {int(selection.labels(ds)[i])}: the head cannot attend to it"
        )
    return layer, h, q_pos, k_pos, k


def _describe(ds: xr.Dataset, value: Any, column: str) -> int | str:
    """For attrs: the position when it is one int, the store's column it is (``ds["io_pos"]``), else
    ``per-sequence``."""
    if value is None:
        return column
    if isinstance(value, xr.DataArray) and isinstance(value.name, str) and value.name in ds:
        if value.equals(ds[value.name]):
            return value.name
    one = _args.scalar(value)
    return "per-sequence" if one is None else one


def attention_attribution(
    ds: xr.Dataset,
    *,
    head: Head,
    query_pos: Positions | None = None,
    key_pos: Positions | None = None,
    top_k: int = 10,
) -> xr.Dataset:
    """Head ``head``'s pre-softmax score at (``query_pos``, ``key_pos``) split into (query component) x (key
    component) terms that sum to it: the query/key decomposition of the copy-suppression paper (McDougall et al.
    2023, head 10.7). With ``Q_i``, ``K_j`` each component's share of the query and key (module docstring: the
    components, the frozen norms, the rotary)::

        terms[b, q_component=i, k_component=j] = Q_i[b, d_head] . K_j[b, d_head] * scale
        score[b] = sum_ij terms[b, i, j]                 (pre-soft-cap on Gemma-2: attrs["scores"])
        top pairs: largest |mean_b terms[b, i, j]|, largest first; top_term = mean_b terms[b, i, j]

    ``query_pos``, ``key_pos``: an int (negative: back from each sequence's last real token) or one per sequence;
    default the store's ``end_pos`` and ``io_pos`` columns (IOI: why the head attends END -> IO). Returns
    ``terms (batch, q_component, k_component)``, their mean over sequences ``mean_terms``, the per-side sums
    ``by_q_component`` / ``by_k_component``, ``score (batch)``, ``reconstruction_error`` (sum of terms - score),
    ``score_stored`` (from the stored q, k, when the store has them), ``attention`` (the stored pattern's value,
    when it has one) and the ``top_k`` pairs (``top_q_component``, ``top_k_component``, ``top_term`` along
    ``rank``). Needs ``resid_pre`` (``--fields default,resid_pre``) and every layer up to the head's.
    """
    layer, h, q_pos, k_pos, k = _check(ds, head, query_pos, key_pos, top_k)
    cfg = ds.hs.config
    kv = ds.hs.kv_head(h)
    scale = np.float32(cfg.score_scale)
    q = side_shares(ds, layer, h, q_pos, QUERY).rename(component="q_component")
    key = side_shares(ds, layer, kv, k_pos, KEY).rename(component="k_component")
    terms = xr.dot(q, key, dim="d_head", optimize=True) * scale
    score = xr.dot(_whole(ds, layer, h, q_pos, QUERY), _whole(ds, layer, kv, k_pos, KEY), dim="d_head") * scale
    out = xr.Dataset({"terms": terms.transpose("batch", "q_component", "k_component"), "score": score})
    out["mean_terms"] = terms.mean("batch")
    out["by_q_component"] = terms.sum("k_component")
    out["by_k_component"] = terms.sum("q_component")
    out["reconstruction_error"] = terms.sum(["q_component", "k_component"]) - score
    if "q" in ds and "k" in ds:
        q_st = f32(ds["q"].sel(layer=layer).isel(head=h, pos=q_pos))
        k_st = f32(ds["k"].sel(layer=layer).isel(kv_head=kv, pos=k_pos))
        out["score_stored"] = xr.dot(q_st, k_st, dim="d_head", optimize=True) * scale
    if "pattern" in ds:
        out["attention"] = f32(ds["pattern"].sel(layer=layer).isel(head=h, query_pos=q_pos, key_pos=k_pos))
    out["query_pos"], out["key_pos"] = q_pos, k_pos
    out = out.merge(top_pairs(out["mean_terms"], k))
    out = out.drop_vars([c for c in ("layer", "head", "pos", "query_pos", "key_pos") if c in out.coords])
    for var in out.variables.values():
        var.encoding = {}  # the store's chunking of the arrays read (pattern) does not fit these shapes
    cap = cfg.attn_logit_softcap
    out.attrs = {
        "analyzer": NAME, "head": f"{layer}.{h}", "layer": layer, "head_index": h, "kv_head": kv, "top_k": k,
        "query_pos": _describe(ds, query_pos, "end_pos"), "key_pos": _describe(ds, key_pos, "io_pos"),
        "scores": f"pre-softcap (model score = c * tanh(score / c), c = {cap:g})" if cap > 0 else "model",
    }  # fmt: skip
    return out


SPEC = AnalyzerSpec(
    NAME,
    attention_attribution,
    REQUIRES,
    doc="Why a head attends: its pre-softmax score at (query, key) split into query x key component terms",
    params={"head": Head, "query_pos": Positions, "key_pos": Positions, "top_k": int},
)
register_analyzer(SPEC)
