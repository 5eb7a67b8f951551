"""Path patching from sender heads to a receiver head's query, offline from two aligned stores.

The seed patches the senders' outputs from a corrupted run (e.g. ABC) into the *query input* of a
receiver head of the clean run (e.g. IOI), leaving everything else clean, and compares the
receiver's ``pattern[END, IO] - pattern[END, S1]`` patched vs clean. With the stores:

    resid' = resid_pre[L_r] + sum_senders (result_corrupt - result_clean)   (end position)
    q      = ln1(resid') @ W_Q[L_r, h_r] + b_Q[L_r, h_r]    (ln1 scale recomputed from resid')
    q      = rotary(q, end)                                 (rotary models)
    pattern[END, :] = softmax_causal(q . k_clean[L_r, kv(h_r)] / sqrt(d_head))

Only the end position's query is computed. Positions ``io``, ``s1``, ``end`` are ints or one per
sequence, and default to the clean store's ``io_pos``, ``s1_pos``, ``end_pos`` columns. Senders must sit in layers before the receiver's:
their direct path is the only one patched, so later-layer senders would not reach its query.
Swap the two stores for the other direction.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import attention_scores, causal_softmax, f32, normalize, require, rotate
from headstore.store_schema import HeadstoreError

NAME = "path-patch-query"
NEEDS = ("resid_pre", "k", "result", "W_Q", "b_Q")


def end_query(resid: xr.DataArray, ds: xr.Dataset, layer: int, head: int, end: xr.DataArray) -> xr.DataArray:
    """(batch, d_head) the receiver's query at the end position from a residual stream (batch, d_model)."""
    w_q = f32(ds["W_Q"].sel(layer=layer).isel(head=head))
    q = xr.dot(normalize(resid, ds), w_q, dim="d_model") + f32(ds["b_Q"].sel(layer=layer).isel(head=head))
    if "rotary_cos" in ds:
        q = rotate(q, ds["rotary_cos"].isel(pos=end), ds["rotary_sin"].isel(pos=end))
    return q


def end_pattern(q: xr.DataArray, k: xr.DataArray, end: xr.DataArray) -> xr.DataArray:
    """(batch, key_pos) causal softmax of ``q . k / sqrt(d_head)`` for the end query."""
    valid = xr.DataArray(np.arange(k.sizes["pos"]), dims="pos") <= end
    return causal_softmax(attention_scores(q, k), valid, "pos").rename(pos="key_pos")


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
    require(clean, NEEDS, NAME)
    require(corrupt, ("result",), NAME)
    _args.check_aligned(clean, corrupt, NAME, ("io_pos", "s1_pos", "end_pos"))
    if clean.hs.config.positional_embedding_type == "rotary" and "rotary_cos" not in clean:
        raise HeadstoreError(f"{NAME}: this rotary model's store lacks rotary_cos/rotary_sin: re-extract it")
    end_da = _args.positions(clean, end, "end", column="end_pos")
    io_da = _args.positions(clean, io, "io", column="io_pos")
    s1_da = _args.positions(clean, s1, "s1", column="s1_pos")

    resid = f32(clean["resid_pre"].sel(layer=l_r).isel(pos=end_da))  # (batch, d_model)
    patched_resid = resid
    for L, h in snd:
        c = f32(corrupt["result"].sel(layer=L).isel(head=h, pos=end_da))
        o = f32(clean["result"].sel(layer=L).isel(head=h, pos=end_da))
        patched_resid = patched_resid + (c - o)
    kv = clean.hs.kv_head(h_r)
    k = f32(clean["k"].sel(layer=l_r).isel(kv_head=kv))  # (batch, pos, d_head), post-rotary
    pat_clean = end_pattern(end_query(resid, clean, l_r, h_r, end_da), k, end_da)
    pat_patched = end_pattern(end_query(patched_resid, clean, l_r, h_r, end_da), k, end_da)
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
        "clean_dataset": str(clean.hs.provenance.dataset.get("kind", "")),
        "corrupt_dataset": str(corrupt.hs.provenance.dataset.get("kind", "")),
    }
    return out
