"""Change in loss from projecting each head's output onto the unembedding of its source tokens (seed 000).

Per head ``(L, h)``: ``result_pre_attn[b, k] = v[b, L, k, kv(h)] @ W_O[L, h]`` is projected onto
``u = W_U[:, tokens[b, k]]`` (``proj = (x.u / |u|^2) u``, kept only where the coefficient is negative
with ``only_negative``; zero where ``u = 0``, as for a padding token whose embedding row is zero and tied to
``W_U``: the seed's formula would divide 0 by 0 and make its whole sequence's losses NaN), then moved by the
head's pattern: ``result_new[b, q] = sum_k pattern[q, k] proj[k]``.
With ``result_orig = result[b, L, q, h] = z[b, L, q, h] @ W_O[L, h]`` and ``ln_final_scale`` frozen, the logits of the clean run
change by

- ``project``: ``((result_new - result_orig) / scale) @ W_U`` (keep only the projection)
- ``perpendicular``: ``ablation - project = (-result_new / scale) @ W_U`` (keep only the rest)
- ``ablation``: ``(-result_orig / scale) @ W_U`` (remove the head)

and ``loss`` is the next-token cross-entropy of the changed logits; ``loss_original`` is that of the clean logits,
recomputed from ``resid_final``; ``mean_increase = mean_{b, q} (loss - loss_original)`` over every real prediction
pooled (the seed's mean over batch and positions). Only real next-token predictions count: ``loss`` and
``loss_original`` are NaN where there is no real next token (``_maths.next_tokens``): at the last position and, on a
right-padded store (own prompts, IOI), wherever ``q + 1 >= length[b]``, so padded positions never enter the mean.
The vocabulary-sized work is done blockwise (one batch chunk x one layer at a time); only per-token losses leave a
block.

The model's own non-linearities: under a final soft-cap (Gemma-2) the changes apply to the pre-cap logits and
the loss is taken on ``c * tanh(logits / c)``, the model's logits; on post-norm models (Gemma-2, OLMo-2) a head
writes through its layer's post-attention norm, frozen (``W_O * ln1_post_w``, ``scale * ln1_post_scale``:
``_maths.head_writes``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from headstore.analyze._maths import (
    f32,
    head_unembed,
    head_writes,
    lead_axes,
    logits,
    next_tokens,
    per_head,
    require,
    softcap,
    unembed_columns,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer

REQUIRES = ("tokens", "v", "pattern", "z", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U")
MODES = ("project", "perpendicular", "ablation")
GRAM_MAX_POS_PER_D_MODEL = 1.0  # unembed the source tokens once per block while seq_len < d_model (fewer flops)


def _token_loss(lg: np.ndarray, nxt: np.ndarray, cap: float = 0.0) -> np.ndarray:
    """``lg`` (..., pos, d_vocab), ``nxt`` (..., pos) with -1 where there is no next token -> (..., pos); ``cap``:
    the final soft-cap applied to ``lg`` first (0: none)."""
    return _token_loss_inplace(np.array(lg, dtype=np.float32), nxt, cap)


def _token_loss_inplace(lg: np.ndarray, nxt: np.ndarray, cap: float = 0.0) -> np.ndarray:
    """``_token_loss`` that uses ``lg`` as its scratch space (one pass fewer, no d_vocab-sized allocation)."""
    softcap(lg, cap)
    safe = np.where(nxt < 0, 0, nxt)
    picked = np.take_along_axis(lg, safe[..., None], axis=-1)[..., 0]
    m = lg.max(axis=-1, keepdims=True)
    lg -= m
    np.exp(lg, out=lg)
    lse = np.log(lg.sum(axis=-1)) + m[..., 0]
    return np.where(nxt < 0, np.nan, lse - picked).astype(np.float32)


def _unembed(x: np.ndarray, w_u: np.ndarray) -> np.ndarray:
    """(..., d_model) @ (d_model, d_vocab) as one 2-D matmul (numpy loops over the leading axes of a
    stacked one: half the speed)."""
    return (x.reshape(-1, x.shape[-1]) @ w_u).reshape(*x.shape[:-1], w_u.shape[-1])


def _block_losses(
    lg: np.ndarray,
    nxt: np.ndarray,
    scale: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    pattern: np.ndarray,
    z: np.ndarray,
    w_o: np.ndarray,
    w_u: np.ndarray,
    only_negative: bool,
    cap: float = 0.0,
) -> np.ndarray:
    """One (batch chunk, layer chunk) block -> losses (batch, layer, mode, head, pos).

    Loop axes are (batch, layer); inputs without ``layer`` carry a size-1 axis there. BLAS runs
    single-threaded here: dask already runs one block per core, and nested BLAS threads on small
    blocks cost ~100x (thread hand-off dominates the tiny matmuls).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _block_losses_1(lg, nxt, scale, u, v, pattern, z, w_o, w_u, only_negative, cap)


def _block_losses_1(
    lg: np.ndarray,
    nxt: np.ndarray,
    scale: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    pattern: np.ndarray,
    z: np.ndarray,
    w_o: np.ndarray,
    w_u: np.ndarray,
    only_negative: bool,
    cap: float = 0.0,
) -> np.ndarray:
    lg, nxt, scale = lead_axes(lg, 2)[:, 0], lead_axes(nxt, 1)[:, 0], lead_axes(scale, 1)[:, 0]
    u = lead_axes(u, 2)[:, 0]  # batch, pos, d_model
    v, pattern, z = lead_axes(v, 3), lead_axes(pattern, 3), lead_axes(z, 3)
    w_o = lead_axes(w_o, 3)[0]  # layer, head, d_head, d_model
    w_u = w_u.reshape(w_u.shape[-2:])
    n_batch, n_layer, n_head, n_pos = v.shape[0], v.shape[1], v.shape[2], v.shape[3]
    out = np.empty((n_batch, n_layer, len(MODES), n_head, n_pos), dtype=np.float32)
    uu = (u * u).sum(-1)  # batch, pos
    inv_uu = np.divide(1.0, uu, out=np.zeros_like(uu), where=uu > 0)  # a zero direction projects to zero
    buf = np.empty(lg.shape, np.float32)  # batch, pos, d_vocab: the changed logits of one mode at a time
    inv_scale = 1.0 / scale[..., None]
    # new[b, q] = sum_k a[b, q, k] u[b, k], so new @ W_U = a @ (u @ W_U): one unembedding of the source
    # tokens shared by every head, then seq-long sums per head instead of a d_model-long matmul
    uw = _unembed(u, w_u) if n_pos < u.shape[-1] * GRAM_MAX_POS_PER_D_MODEL else None  # batch, key_pos, d_vocab
    for li in range(n_layer):
        for h in range(n_head):
            pre = v[:, li, h] @ w_o[li, h]  # batch, key_pos, d_model
            coeff = (pre * u).sum(-1) * inv_uu
            if only_negative:
                coeff = np.where(coeff < 0, coeff, 0.0).astype(np.float32)
            a = pattern[:, li, h] * coeff[:, None, :]  # batch, query_pos, key_pos
            if uw is not None:
                d_new = (a @ uw) * inv_scale  # batch, pos, d_vocab
            else:
                d_new = _unembed(np.einsum("bqk,bkd->bqd", a, u) * inv_scale, w_u)
            # the three deltas (new - orig, -new, -orig) are linear in these two products
            zs = (z[:, li, h] * inv_scale).reshape(-1, z.shape[-1])  # (batch pos), d_head
            d_orig = head_unembed(zs, w_o[li, h], w_u).reshape(n_batch, n_pos, -1)  # result_orig / scale @ W_U
            np.add(lg, d_new, out=buf)
            buf -= d_orig
            out[:, li, 0, h] = _token_loss_inplace(buf, nxt, cap)  # project
            np.subtract(lg, d_new, out=buf)
            out[:, li, 1, h] = _token_loss_inplace(buf, nxt, cap)  # perpendicular
            np.subtract(lg, d_orig, out=buf)
            out[:, li, 2, h] = _token_loss_inplace(buf, nxt, cap)  # ablation
    return out


def projection_loss(ds: xr.Dataset, *, only_negative: bool = False) -> xr.Dataset:
    """Per-token loss after keeping only the projection / only the perpendicular part / nothing, per head.

    ``loss`` (layer, head, mode, batch, pos) and ``loss_original`` (batch, pos) are NaN where ``q`` has no real next
    token (the last position, and ``q + 1 >= length[b]`` on a padded store); ``mean_increase`` (layer, head, mode)
    averages ``loss - loss_original`` over the others."""
    require(ds, REQUIRES, "projection-loss")
    cap = ds.hs.config.final_logit_softcap
    clean = logits(ds, capped=False).astype(np.float32)  # batch, pos, d_vocab (lazy, chunked along batch)
    nxt = next_tokens(ds)
    scale = ds["ln_final_scale"].astype(np.float32)
    w_write, inv_post = head_writes(ds, "projection-loss")
    if inv_post is not None:
        scale = scale / inv_post  # (batch, layer, pos): ln_final_scale * ln1_post_scale
    w_u = f32(ds["W_U"])
    loss_original = xr.apply_ufunc(
        _token_loss,
        clean.chunk({"pos": -1, "d_vocab": -1}),  # xr.dot may split pos (it does from ~40 positions on)
        nxt,
        kwargs={"cap": cap},
        input_core_dims=[["pos", "d_vocab"], ["pos"]],
        output_core_dims=[["pos"]],
        dask="parallelized",
        output_dtypes=[np.float32],
    )
    # one block = the store's batch chunk x one layer, whole along every other dim
    batch_chunks = ds["tokens"].chunksizes.get("batch", ds.sizes["batch"])

    def block(x: xr.DataArray) -> xr.DataArray:
        return x.chunk({d: (batch_chunks if d == "batch" else 1 if d == "layer" else -1) for d in x.dims})

    v = per_head(f32(ds["v"]), ds)
    loss = xr.apply_ufunc(
        _block_losses,
        *(block(x) for x in (clean, nxt, scale, unembed_columns(ds), v, f32(ds["pattern"]), f32(ds["z"]))),
        block(w_write),
        w_u,
        kwargs={"only_negative": only_negative, "cap": cap},
        input_core_dims=[
            ["pos", "d_vocab"],
            ["pos"],
            ["pos"],
            ["pos", "d_model"],
            ["head", "pos", "d_head"],
            ["head", "query_pos", "key_pos"],
            ["head", "pos", "d_head"],
            ["head", "d_head", "d_model"],
            ["d_model", "d_vocab"],
        ],
        output_core_dims=[["mode", "head", "pos"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"allow_rechunk": True, "output_sizes": {"mode": len(MODES)}},
    )
    loss = loss.assign_coords(mode=list(MODES)).transpose("layer", "head", "mode", "batch", "pos")
    loss_original = loss_original.transpose("batch", "pos")
    mean_increase = (loss - loss_original).mean(["batch", "pos"])  # skips the NaN: no real next token
    out = xr.Dataset(
        {
            "mean_increase": mean_increase.transpose("layer", "head", "mode"),
            "loss": loss,
            "loss_original": loss_original,
        }
    )
    out.attrs.update({"analyzer": "projection-loss", "only_negative": int(only_negative)})
    return out


SPEC = AnalyzerSpec(
    "projection-loss",
    projection_loss,
    REQUIRES,
    doc="Change in loss when each head keeps only its projection onto the source tokens' unembeddings (seed 000).",
    params={"only_negative": bool},
)
register_analyzer(SPEC)
