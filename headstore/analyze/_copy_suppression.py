"""Copy suppression: how much each head pushes down the logit of the token it attends to (seed 000, Part 1).

For head ``(L, h)`` and source position ``k``, ``result_pre_attn[b, k] = v[b, L, k, kv(h)] @ W_O[L, h]`` is
what the head would write if it paid full attention to ``k``; its coefficient on the unembedding of
the source token is ``coef[b, L, h, k] = result_pre_attn[b, k] . W_U[:, tokens[b, k]]``. Weighted by
the attention that real non-BOS queries pay to real non-BOS keys and scaled by ``ln_final``:

- ``per_position[b, L, h, k] = sum_q coef * a[b, L, h, q, k] / ln_final_scale[b, q]``
- ``per_sequence[b, L, h] = sum_k per_position * sum_q a / sum_k sum_q a``
- ``score[L, h] = mean_b per_sequence`` (negative: the head suppresses what it copies)

where ``a = pattern * m`` and ``m[b, q, k] = 1`` when neither ``q`` nor ``k`` holds BOS or padding. Padding is
what a right-padded store (own prompts, IOI) holds past each sequence's ``length`` column: ``m`` is 0 where
``q >= length[b]`` or ``k >= length[b]`` (with causal attention only padded queries attend to padding), whatever the
pad token is (SmolLM2's pad 2 is not its BOS 1); a store without ``length`` has none. Every head in one lazy pass;
the vocabulary is only ever touched through the columns ``W_U[:, tokens]``.

On post-norm models (Gemma-2, OLMo-2) a head writes through its layer's post-attention norm, frozen at the
query: ``W_O`` becomes ``W_O * ln1_post_w`` and ``1 / ln_final_scale[b, q]`` gains a factor
``1 / ln1_post_scale[b, L, q]`` (``_maths.head_writes``). The logits are the pre-soft-cap ones on soft-capped
models (a linear attribution, ``attrs["logits"]``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze._apply import apply_blocks, store_blocks
from headstore.analyze._maths import (
    _take_columns,
    f32,
    head_writes,
    kv_index,
    lead_axes,
    logits_kind,
    not_bos,
    real_positions,
    require,
)
from headstore.analyze.registry import AnalyzerSpec, register_analyzer

REQUIRES = ("tokens", "v", "pattern", "ln_final_scale", "W_O", "W_U")


# each dask block holds about this many bytes of float32 pattern: layers are grouped so that the number of tasks
# stays small against the data at 10^5-10^6 tokens (the measurement: docs/benchmarks.md, "Figures behind constants")
BLOCK_BYTES = 32 * 2**20


def _block(
    v: np.ndarray,
    pattern: np.ndarray,
    w_o: np.ndarray,
    tokens: np.ndarray,
    w_u: np.ndarray,
    keep: np.ndarray,
    inv_scale: np.ndarray,
    kv: np.ndarray,
    only_negative: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (batch chunk, layer group) block, every head: ``(per_position, num, den)``; ``per_position`` is
    (batch, layer, head, key_pos), ``per_sequence = num / den`` with ``num = sum_k per_position * attn`` and
    ``den = sum_k attn`` (batch, layer, head).

    ``v`` (b, l, kv_head, pos, d_head; query head ``h`` reads ``kv[h]``), ``pattern`` (b, l, head, q, k), as
    stored (float16 upcast here), ``w_o`` (l, head, d_head, d_model), ``tokens`` (b, pos) and ``w_u``
    (d_model, d_vocab) give ``u = W_U[:, tokens]`` (b, pos, d_model), ``keep`` / ``inv_scale`` (b, pos;
    ``inv_scale`` (b, l, pos) on post-norm models; ``keep``: 1 at a real, non-BOS token): the module docstring's
    sums, with ``coef[b, l, h, k] = (v[b, l, kv[h], k] @ W_O[l, h]) . u[b, k]``.
    """
    v, pattern = lead_axes(v, 3), lead_axes(pattern, 3)
    w_o, tok = lead_axes(w_o, 3)[0], lead_axes(tokens, 1)[:, 0]  # (l, h, d_head, d_model), (b, pos)
    keep, inv_scale = lead_axes(keep, 1)[:, 0], lead_axes(inv_scale, 1)  # inv_scale: b, l (or 1), q
    n_b, n_l, n_kv, n_k, n_d = v.shape
    n_h = w_o.shape[1]
    if not np.array_equal(kv, np.arange(n_h) // (n_h // n_kv)):  # not grouped as kv_index groups: one kv per head
        v, n_kv = v[:, :, kv], n_h
    # W_O[l, h] @ W_U[:, t] once per distinct token t of the block (one BLAS product; the unembedding columns
    # gathered here rather than as a dask input: dask would hold every batch chunk's columns), then each
    # position's row, dotted with v over d_head
    distinct, which = np.unique(tok, return_inverse=True)
    u = _take_columns(distinct[None], lead_axes(w_u, 2)[0, 0])[0]  # (distinct, d_model)
    w_ou = u @ w_o.reshape(n_l * n_h * n_d, -1).T  # (distinct, l h d)
    w_ou = w_ou[which.ravel()].reshape(n_b * n_k, n_l, n_kv, n_h // n_kv, n_d)
    v_t = v.astype(np.float32, copy=False).transpose(0, 3, 1, 2, 4).reshape(n_b * n_k, n_l, n_kv, n_d)
    coef = np.einsum("nlkgd,nlkd->nlkg", w_ou, v_t).reshape(n_b, n_k, n_l, n_h).transpose(0, 2, 3, 1)  # b, l, h, k
    if only_negative:
        coef = np.where(coef < 0, coef, np.float32(0.0))
    # sum_q w[q] a[q, k] for w = inv_scale * keep and w = keep in one product over the pattern as stored (float16
    # upcast once, float32 read in place): the mask on q is in the weights, the mask on k applied after
    weights = np.stack(np.broadcast_arrays(inv_scale * keep[:, None, :], keep[:, None, :]), axis=2)  # b, l|1, 2, q
    sums = np.matmul(weights[:, :, None], pattern.astype(np.float32, copy=False))  # b, l, h, 2, k
    num, attn = sums[..., 0, :] * keep[:, None, None, :], sums[..., 1, :] * keep[:, None, None, :]
    per_position = (coef * num).astype(np.float32, copy=False)
    return per_position, (per_position * attn).sum(-1), attn.sum(-1)


def layers_per_block(ds: xr.Dataset) -> int:
    """Layers in one block: as many as keep a batch chunk's float32 pattern near ``BLOCK_BYTES`` (at least 1)."""
    batch_chunks = ds["tokens"].chunksizes.get("batch", ds.sizes["batch"])
    b_max = max(batch_chunks, default=1) if isinstance(batch_chunks, tuple) else batch_chunks
    per_layer = ds.sizes["head"] * ds.sizes["query_pos"] * ds.sizes["key_pos"] * 4 * b_max
    return max(1, min(ds.sizes["layer"], BLOCK_BYTES // per_layer))


def copy_suppression(ds: xr.Dataset, *, only_negative: bool = False) -> xr.Dataset:
    """Per-position, per-sequence and mean source-suppression scores of every head.

    ``per_position[b, L, h, k] = coef[b, L, h, k] * sum_q a[b, L, h, q, k] / ln_final_scale[b, q]``,
    ``per_sequence[b, L, h] = sum_k per_position * attn / sum_k attn`` with ``attn = sum_q a``,
    ``score[L, h] = mean_b per_sequence``; ``coef[b, L, h, k] = (v @ W_O[L, h]) . W_U[:, tokens[b, k]]``;
    ``a = pattern`` where neither ``q`` nor ``k`` is BOS or padding (``>= length[b]``), else 0.
    """
    require(ds, REQUIRES, "copy-suppression")
    w_write, inv_post = head_writes(ds, "copy-suppression")
    inv_scale = 1.0 / ds["ln_final_scale"].astype(np.float32)
    if inv_post is not None:
        inv_scale = inv_scale * inv_post  # (batch, layer, pos)
    # the store's batch chunk x its stored layer block (a shard: read by zarrs, never split), whole elsewhere; in
    # memory, layers grouped to about BLOCK_BYTES
    block = store_blocks(ds, "pattern", layers=layers_per_block(ds))

    per_position, num, den = apply_blocks(
        _block,
        block(ds["v"]),
        block(ds["pattern"]),
        block(w_write),
        block(ds["tokens"]),
        f32(ds["W_U"]).transpose("d_model", "d_vocab"),  # one chunk, handed to every block as it is
        block(not_bos(ds) * real_positions(ds).astype(np.float32)),  # real, non-BOS tokens
        block(inv_scale),
        kwargs={"kv": kv_index(ds).values, "only_negative": only_negative},
        input_core_dims=[
            ["kv_head", "pos", "d_head"],
            ["head", "query_pos", "key_pos"],
            ["head", "d_head", "d_model"],
            ["pos"],
            ["d_model", "d_vocab"],
            ["pos"],
            ["pos"],
        ],
        output_core_dims=[["head", "key_pos"], ["head"], ["head"]],
        output_dtypes=[np.float32, np.float32, np.float32],
    )
    # a layer without a stored pattern stays NaN (its sums are NaN)
    per_sequence = num / den
    score = per_sequence.mean("batch")
    out = xr.Dataset(
        {
            "per_position": per_position.rename(key_pos="pos").transpose("layer", "head", "batch", "pos"),
            "per_sequence": per_sequence.transpose("layer", "head", "batch"),
            "score": score.transpose("layer", "head"),
        }
    )
    out.attrs.update({"analyzer": "copy-suppression", "only_negative": int(only_negative), "logits": logits_kind(ds)})
    return out


SPEC = AnalyzerSpec(
    "copy-suppression",
    copy_suppression,
    REQUIRES,
    doc="How much each head suppresses the logit of the token it attends to (seed 000, Part 1).",
    params={"only_negative": bool},
)
register_analyzer(SPEC)
