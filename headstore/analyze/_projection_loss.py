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

from collections.abc import Callable

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from headstore.analyze import _apply
from headstore.analyze._apply import apply_blocks, vocab_rows
from headstore.analyze._maths import (
    f32,
    head_unembedder,
    head_writes,
    lead_axes,
    logits,
    matmul_rows,
    next_tokens,
    per_head,
    require,
    softcap,
    unembed_columns,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer

REQUIRES = ("tokens", "v", "pattern", "z", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U")
MODES = ("project", "perpendicular", "ablation")
GRAM_MAX_POS_PER_D_MODEL = 1.0  # unembed the source tokens once per batch group while seq_len < d_model (fewer flops)


def _group_blocks(ds: xr.Dataset) -> Callable[[xr.DataArray], xr.DataArray]:
    """A rechunker onto (batch group, one layer) blocks (``_apply.vocab_rows``), every other dim whole."""
    rows = vocab_rows(ds)

    def block(x: xr.DataArray) -> xr.DataArray:
        return x.chunk({d: (rows if d == "batch" else 1 if d == "layer" else -1) for d in x.dims})

    return block


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


def _tiles(n_batch: int, n_pos: int, rows: int) -> list[tuple[slice, slice, int, int]]:
    """``(batch slice, pos slice, n_batch, n_pos)`` tiles of about ``rows`` token rows: whole sequences together
    where they are short, runs of positions of one sequence where they are long."""
    nb = max(1, rows // n_pos)
    nq = -(-n_pos // -(-n_pos // max(1, rows)))  # even runs of at most ``rows`` positions
    return [
        (slice(b, b + nb), slice(q, q + nq), min(nb, n_batch - b), min(nq, n_pos - q))
        for b in range(0, n_batch, nb)
        for q in range(0, n_pos, nq)
    ]


def _block_losses(
    lg: np.ndarray,
    nxt: np.ndarray,
    scale: np.ndarray,
    u: np.ndarray,
    uw: np.ndarray,
    v: np.ndarray,
    pattern: np.ndarray,
    z: np.ndarray,
    w_o: np.ndarray,
    w_u: np.ndarray,
    only_negative: bool,
    cap: float = 0.0,
    gram: bool = True,
) -> np.ndarray:
    """One (batch group, layer) block -> losses (batch, layer, mode, head, pos).

    Loop axes are (batch, layer); inputs without ``layer`` carry a size-1 axis there. BLAS runs
    single-threaded here: dask already runs one block per core, and nested BLAS threads on small
    blocks cost ~100x (thread hand-off dominates the tiny matmuls).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _block_losses_1(lg, nxt, scale, u, uw, v, pattern, z, w_o, w_u, only_negative, cap, gram)


def _block_losses_1(
    lg: np.ndarray,
    nxt: np.ndarray,
    scale: np.ndarray,
    u: np.ndarray,
    uw: np.ndarray,
    v: np.ndarray,
    pattern: np.ndarray,
    z: np.ndarray,
    w_o: np.ndarray,
    w_u: np.ndarray,
    only_negative: bool,
    cap: float,
    gram: bool,
) -> np.ndarray:
    lg = np.ascontiguousarray(lead_axes(lg, 2)[:, 0])  # tiles of rows read whole rows (a no-op where C order)
    nxt, scale = lead_axes(nxt, 1)[:, 0], lead_axes(scale, 1)[:, 0]
    u, uw = lead_axes(u, 2)[:, 0], lead_axes(uw, 2)[:, 0]  # batch, pos, d_model | d_vocab
    v, pattern, z = lead_axes(v, 3), lead_axes(pattern, 3), lead_axes(z, 3)
    w_o = lead_axes(w_o, 3)[0]  # layer, head, d_head, d_model
    w_u = w_u.reshape(w_u.shape[-2], w_u.shape[-1])
    n_batch, n_layer, n_head, n_pos = v.shape[0], v.shape[1], v.shape[2], v.shape[3]
    out = np.empty((n_batch, n_layer, len(MODES), n_head, n_pos), dtype=np.float32)
    uu = (u * u).sum(-1)  # batch, pos
    inv_uu = np.divide(1.0, uu, out=np.zeros_like(uu), where=uu > 0)  # a zero direction projects to zero
    inv_scale = 1.0 / scale[..., None]
    tiles = _tiles(n_batch, n_pos, _apply.VOCAB_ROW_TILE)
    d_head, d_model, d_vocab = z.shape[-1], w_u.shape[-2], w_u.shape[-1]
    rows = max(nb * nq for _, _, nb, nq in tiles)
    d_new, d_orig, buf = (np.empty((rows, d_vocab), np.float32) for _ in range(3))
    for li in range(n_layer):
        for h in range(n_head):
            pre = v[:, li, h] @ w_o[li, h]  # batch, key_pos, d_model
            coeff = (pre * u).sum(-1) * inv_uu
            if only_negative:
                coeff = np.where(coeff < 0, coeff, 0.0).astype(np.float32)
            a = pattern[:, li, h] * coeff[:, None, :]  # batch, query_pos, key_pos
            # new[b, q] = sum_k a[b, q, k] u[b, k], so new @ W_U = a @ (u @ W_U): the source tokens' unembedding
            # ``uw`` is shared by every head and layer (short sequences); else new is unembedded per head
            src = a if gram else np.einsum("bqk,bkd->bqd", a, u) * inv_scale  # else new: batch, pos, d_model
            zs = z[:, li, h] * inv_scale  # batch, pos, d_head: result_orig / scale = zs @ W_O
            unembed = head_unembedder(w_o[li, h], w_u, n_batch * n_pos)  # the cheaper order for the whole block
            for bs, qs, nb, nq in tiles:  # the vocabulary-sized work a few rows at a time, in cache
                n = nb * nq
                dn, do, bf = d_new[:n], d_orig[:n], buf[:n]
                if gram:  # causal: a[b, q, k] = 0 for k > q, so the keys past the tile's last query drop out
                    k_end = qs.stop if nb == 1 else n_pos
                    np.matmul(src[bs, qs, :k_end], uw[bs, :k_end], out=dn.reshape(nb, nq, d_vocab))
                    dn *= inv_scale[bs, qs].reshape(n, 1)
                else:
                    np.matmul(src[bs, qs].reshape(n, d_model), w_u, out=dn)
                unembed(zs[bs, qs].reshape(n, d_head), do)
                lt, t = lg[bs, qs].reshape(n, d_vocab), nxt[bs, qs].reshape(n)
                # the three deltas (new - orig, -new, -orig) are linear in these two products
                np.add(lt, dn, out=bf)
                bf -= do
                out[bs, li, 0, h, qs] = _token_loss_inplace(bf, t, cap).reshape(nb, nq)  # project
                np.subtract(lt, dn, out=bf)
                out[bs, li, 1, h, qs] = _token_loss_inplace(bf, t, cap).reshape(nb, nq)  # perpendicular
                np.subtract(lt, do, out=bf)
                out[bs, li, 2, h, qs] = _token_loss_inplace(bf, t, cap).reshape(nb, nq)  # ablation
    return out


def _clean_losses(clean: xr.DataArray, nxt: xr.DataArray, cap: float) -> xr.DataArray:
    """(batch, pos) the clean run's next-token losses, NaN where there is no real next token."""
    return xr.apply_ufunc(
        _token_loss,
        clean.chunk({"pos": -1, "d_vocab": -1}),  # whole sequences and vocabulary in each block
        nxt,
        kwargs={"cap": cap},
        input_core_dims=[["pos", "d_vocab"], ["pos"]],
        output_core_dims=[["pos"]],
        dask="parallelized",
        output_dtypes=[np.float32],
    )


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
    loss_original = _clean_losses(clean, nxt, cap)
    # one block = a group of the store's batch chunks x one layer, whole along every other dim
    block = _group_blocks(ds)
    u = block(unembed_columns(ds))
    gram = ds.sizes["pos"] < ds.sizes["d_model"] * GRAM_MAX_POS_PER_D_MODEL
    # the source tokens' unembedding u @ W_U, once per batch group (shared by every layer's block)
    uw = apply_blocks(
        matmul_rows, u, w_u, input_core_dims=[["d_model"], ["d_model", "d_vocab"]],
        output_core_dims=[["d_vocab"]], output_dtypes=[np.float32],
    ) if gram else u  # fmt: skip
    loss = apply_blocks(
        _block_losses,
        *(block(x) for x in (clean, nxt, scale)),
        u,
        uw,
        *(block(x) for x in (per_head(f32(ds["v"]), ds), f32(ds["pattern"]), f32(ds["z"]), w_write)),
        w_u,
        kwargs={"only_negative": only_negative, "cap": cap, "gram": gram},
        input_core_dims=[
            ["pos", "d_vocab"],
            ["pos"],
            ["pos"],
            ["pos", "d_model"],
            ["pos", "d_vocab" if gram else "d_model"],
            ["head", "pos", "d_head"],
            ["head", "query_pos", "key_pos"],
            ["head", "pos", "d_head"],
            ["head", "d_head", "d_model"],
            ["d_model", "d_vocab"],
        ],
        output_core_dims=[["mode", "head", "pos"]],
        output_dtypes=[np.float32],
        output_sizes={"mode": len(MODES)},
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
