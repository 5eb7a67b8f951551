"""Path patching from sender heads to a receiver head's query, offline from two aligned stores.

The seed patches the senders' outputs from a corrupted run (e.g. ABC) into the *query input* of a
receiver head of the clean run (e.g. IOI), leaving everything else clean, and compares the
receiver's ``pattern[END, IO] - pattern[END, S1]`` patched vs clean. With the stores, at the end position:

    resid' = resid_pre[L_r] + sum_senders (result_corrupt - result_clean)
    q      = ln1(resid') @ W_Q[L_r, h_r] + b_Q[L_r, h_r]    (ln1 scale recomputed from resid')
    q      = q_norm(q)                                      (models with q/k norm)
    q      = rotary(q, end)                                 (rotary models)
    pattern[END, :] = softmax_causal(cap(q . k_clean[L_r, kv(h_r)] * scale))

with the model's own non-linearities from the store's config: ``scale`` (``1/sqrt(d_head)``, Gemma-2's
``query_pre_attn_scalar ** -0.5``), the attention soft-cap ``cap`` (Gemma-2), the receiver layer's sliding
window in the mask (Mistral, Gemma-2), partial and interleaved rotary (GPT-NeoX, Phi-3, GPT-J), the q norm
(Qwen3: RMSNorm of the head's query over d_head, times its gain; OLMo-2: over every head's query, the
other heads' queries left clean), no ln1 where the model has none (OLMo-2). On post-norm models (Gemma-2,
OLMo-2) a layer adds ``post(S) = g * S / sqrt(mean(S^2) + eps)`` of its heads' summed output
``S = sum_h result_h + b_O``, so the senders' change is ``post(S + delta) - post(S)`` per sender layer, the
norm recomputed on the patched sum as ln1's is.

Only the end position's query is computed. Positions ``io``, ``s1``, ``end`` are ints or one per
sequence, and default to the clean store's ``io_pos``, ``s1_pos``, ``end_pos`` columns; ``io`` and ``s1`` after
``end`` in some sequence are refused (the end query cannot attend to them). Senders must sit in layers before
the receiver's: their direct path is the only one patched, so later-layer senders would not reach its query.
Swap the two stores for the other direction.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import (
    attention_scores,
    causal_softmax,
    f32,
    normalize,
    require,
    rms_normalize,
    rotate,
    softcap,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Head, Heads, Positions
from headstore.store_schema import HeadstoreError
from headstore.store_schema.attention import visible

NAME = "path-patch-query"
NEEDS = ("resid_pre", "k", "result", "W_Q", "b_Q")
COLUMNS = ("io_pos", "s1_pos", "end_pos")  # read when no value is passed
REQUIRES = (*NEEDS, *COLUMNS)


def _needs(ds: xr.Dataset) -> tuple[str, ...]:
    cfg = ds.hs.config
    return (*NEEDS, *(("q_norm_w",) if cfg.qk_norm else ()), *(("ln1_post_w", "b_O") if cfg.post_norm else ()))


def end_query(resid: xr.DataArray, ds: xr.Dataset, layer: int, head: int, end: xr.DataArray,
              clean_resid: xr.DataArray | None = None) -> xr.DataArray:  # fmt: skip
    """(batch, d_head) the receiver's query at the end position from a residual stream (batch, d_model).

    ``clean_resid``: the unpatched stream, which the other heads' queries read where the q norm spans every
    head (``qk_norm == "full"``, OLMo-2); None: ``resid`` itself."""
    cfg = ds.hs.config
    w_q, b_q = f32(ds["W_Q"].sel(layer=layer)), f32(ds["b_Q"].sel(layer=layer))

    def queries(x: xr.DataArray, w: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
        x = normalize(x, ds) if cfg.pre_norm else f32(x)
        return xr.dot(x, w, dim="d_model", optimize=True) + b

    if cfg.qk_norm == "full":  # (batch, head, d_head): every head's query, the receiver's patched
        q_all = queries(resid if clean_resid is None else clean_resid, w_q, b_q)
        mine = xr.DataArray(np.arange(cfg.n_heads) == head, dims="head")
        q_all = xr.where(mine, queries(resid, w_q, b_q), q_all)
        q = (rms_normalize(q_all, ["head", "d_head"], cfg.eps) * f32(ds["q_norm_w"].sel(layer=layer))).isel(head=head)
    else:
        q = queries(resid, w_q.isel(head=head), b_q.isel(head=head))
        if cfg.qk_norm == "per_head":
            q = rms_normalize(q, "d_head", cfg.eps) * f32(ds["q_norm_w"].sel(layer=layer).isel(head=head))
    if "rotary_cos" in ds:
        q = rotate(q, ds["rotary_cos"].isel(pos=end), ds["rotary_sin"].isel(pos=end), cfg.rotary_style)
    return q


def end_pattern(q: xr.DataArray, k: xr.DataArray, end: xr.DataArray, ds: xr.Dataset | None = None,
                layer: int | None = None) -> xr.DataArray:  # fmt: skip
    """(batch, key_pos) softmax of ``cap(q . k * scale)`` for the end query over the keys it sees (causal, and
    within the layer's sliding window); ``ds`` None: ``1/sqrt(d_head)``, causal only."""
    pos = xr.DataArray(np.arange(k.sizes["pos"]), dims="pos")
    if ds is None:
        return causal_softmax(attention_scores(q, k), visible(end, pos), "pos").rename(pos="key_pos")
    cfg = ds.hs.config
    valid = visible(end, pos, cfg.window(int(layer)) if layer is not None else 0)
    scale = None if cfg.score_scale == cfg.d_head**-0.5 else cfg.score_scale  # None: divide by sqrt(d_head), as before
    scores = softcap(attention_scores(q, k, scale), cfg.attn_logit_softcap)
    return causal_softmax(scores, valid, "pos").rename(pos="key_pos")


def senders_change(clean: xr.Dataset, corrupt: xr.Dataset, senders: list[tuple[int, int]],
                   end: xr.DataArray) -> xr.DataArray:  # fmt: skip
    """(batch, d_model) the change to the residual at ``end`` when ``senders`` take their corrupt outputs, read
    once over the sender layers with a (layer, head) mask ``m`` of the senders::

        delta[b, layer] = sum_head m * (result_corrupt - result_clean)[b, layer, end[b], head]
        change[b] = sum_layer delta                                    (pre-norm models)
        change[b] = sum_layer g * (post(S + delta) - post(S))          (post-norm: S = sum_head result_clean + b_O,
                                                                        post(x) = x / sqrt(mean_d_model x^2 + eps))
    """
    layers = sorted({L for L, _ in senders})
    m = np.zeros((len(layers), clean.hs.config.n_heads), bool)
    for L, h in senders:
        m[layers.index(L), h] = True  # heads by position, as isel(head=h)
    mask = xr.DataArray(m, dims=("layer", "head"), coords={"layer": layers})
    c = f32(corrupt["result"].sel(layer=layers).isel(pos=end))  # (batch, layer, head, d_model)
    o = f32(clean["result"].sel(layer=layers).isel(pos=end))
    delta = xr.where(mask, c - o, np.float32(0)).sum("head")  # (batch, layer, d_model)
    if clean.hs.config.post_norm:  # each sender layer's write passes its post-attention norm, recomputed
        eps = clean.hs.config.eps
        total = o.sum("head") + f32(clean["b_O"].sel(layer=layers))
        gain = f32(clean["ln1_post_w"].sel(layer=layers))
        delta = (rms_normalize(total + delta, "d_model", eps) - rms_normalize(total, "d_model", eps)) * gain
    return delta.sum("layer")


def _io_minus_s1(pattern_end: xr.DataArray, io: xr.DataArray, s1: xr.DataArray) -> xr.DataArray:
    return pattern_end.isel(key_pos=io) - pattern_end.isel(key_pos=s1)


def path_patch_query(
    clean: xr.Dataset,
    corrupt: xr.Dataset,
    *,
    senders: _args.Heads,
    receiver: _args.Head,
    io: _args.Positions | None = None,
    s1: _args.Positions | None = None,
    end: _args.Positions | None = None,
) -> xr.Dataset:
    """Receiver's ``pattern[end, io] - pattern[end, s1]`` with the senders' outputs patched from ``corrupt`` into its query.

    ``senders``: a list of ``(layer, head)`` before the receiver's layer (``[]`` for none, ``"all"`` for every
    head of the earlier layers); ``receiver``: one ``(layer, head)``.
    """
    require(clean, _needs(clean), NAME)
    require(corrupt, ("result",), NAME)
    l_r, h_r = _args.head(clean, receiver, "receiver")
    if isinstance(senders, str) and senders == "all":
        snd = [(L, h) for L, h in clean.hs.heads if L < l_r]
    else:
        snd = _args.heads(clean, senders, "senders")
    late = [(L, h) for L, h in snd if L >= l_r]
    if late:
        raise HeadstoreError(
            f"senders must be (layer, head) pairs before layer {l_r} (the receiver's): {late} are not, "
            "and only earlier layers' heads reach its query"
        )
    _args.check_aligned(clean, corrupt, NAME, ("io_pos", "s1_pos", "end_pos"))
    if clean.hs.config.positional_embedding_type == "rotary" and "rotary_cos" not in clean:
        raise HeadstoreError(f"{NAME}: this rotary model's store lacks rotary_cos/rotary_sin: re-extract it")
    end_da = _args.positions(clean, end, "end", column="end_pos")
    io_da = _args.positions(clean, io, "io", column="io_pos")
    s1_da = _args.positions(clean, s1, "s1", column="s1_pos")
    _args.check_causal(clean, io_da, "io", end_da, "end")
    _args.check_causal(clean, s1_da, "s1", end_da, "end")

    resid = f32(clean["resid_pre"].sel(layer=l_r).isel(pos=end_da))  # (batch, d_model)
    patched_resid = resid + senders_change(clean, corrupt, snd, end_da) if snd else resid
    kv = clean.hs.kv_head(h_r)
    k = f32(clean["k"].sel(layer=l_r).isel(kv_head=kv))  # (batch, pos, d_head), post-rotary
    pat_clean = end_pattern(end_query(resid, clean, l_r, h_r, end_da), k, end_da, clean, l_r)
    pat_patched = end_pattern(end_query(patched_resid, clean, l_r, h_r, end_da, resid), k, end_da, clean, l_r)
    out = xr.Dataset(
        {
            "patched": _io_minus_s1(pat_patched, io_da, s1_da),
            "clean": _io_minus_s1(pat_clean, io_da, s1_da),
            "pattern_end_patched": pat_patched,
            "pattern_end_clean": pat_clean,
        }
    )
    out["change"] = out["patched"] - out["clean"]
    if "pattern" in clean:
        stored = clean["pattern"].sel(layer=l_r).isel(head=h_r, query_pos=end_da)
        out["clean_stored"] = _io_minus_s1(f32(stored), io_da, s1_da)
    out = out.drop_vars([c for c in ("layer", "head", "pos", "query_pos", "key_pos") if c in out.coords])
    out.attrs = {
        "analyzer": NAME,
        "senders": ",".join(f"{L}.{h}" for L, h in snd),
        "receiver": f"{l_r}.{h_r}",
        "receiver_layer": l_r,
        "receiver_head": h_r,
        "receiver_kv_head": kv,
        "clean_dataset": clean.hs.provenance.dataset.kind,
        "corrupt_dataset": corrupt.hs.provenance.dataset.kind,
    }
    return out


SPEC = AnalyzerSpec(
    NAME,
    path_patch_query,
    REQUIRES,
    n_stores=2,
    doc="path-patch senders' outputs (2nd store) into a receiver head's query (1st store): END->IO minus END->S1",
    params={"senders": Heads, "receiver": Head, "io": Positions, "s1": Positions, "end": Positions},
)
register_analyzer(SPEC)
