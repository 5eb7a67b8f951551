"""Copy suppression: how much each head pushes down the logit of the token it attends to (seed 000, Part 1).

For head ``(L, h)`` and source position ``k``, ``result_pre_attn[b, k] = v[b, L, k, kv(h)] @ W_O[L, h]`` is
what the head would write if it paid full attention to ``k``; its coefficient on the unembedding of
the source token is ``coef[b, L, h, k] = result_pre_attn[b, k] . W_U[:, tokens[b, k]]``. Weighted by
the attention that non-BOS queries pay to non-BOS keys and scaled by ``ln_final``:

- ``per_position[b, L, h, k] = sum_q coef * a[b, L, h, q, k] / ln_final_scale[b, q]``
- ``per_sequence[b, L, h] = sum_k per_position * sum_q a / sum_k sum_q a``
- ``score[L, h] = mean_b per_sequence`` (negative: the head suppresses what it copies)

where ``a = pattern * m`` and ``m[b, q, k] = 1`` when neither ``q`` nor ``k`` holds BOS. Every head
in one lazy pass; the vocabulary is only ever touched through the columns ``W_U[:, tokens]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from headstore.analyze._ops import bos_id, f32, per_head, require
from headstore.analyze._plots import head_table, layer_head_heatmaps
from headstore.analyze._registry import AnalyzerSpec

REQUIRES = ("tokens", "v", "pattern", "ln_final_scale", "W_O", "W_U")


def _take_columns(tokens: np.ndarray, w_u: np.ndarray) -> np.ndarray:
    # tokens (..., pos), w_u (..., d_model, d_vocab) -> (..., pos, d_model)
    w = w_u.reshape(w_u.shape[-2:])
    return np.moveaxis(w[:, tokens], 0, -1).astype(np.float32, copy=False)


def unembed_columns(ds: xr.Dataset) -> xr.DataArray:
    """``(batch, pos, d_model)``: the unembedding column of each token, ``W_U[:, tokens[b, p]]``.

    Gathered blockwise along ``batch`` (never a ``(tokens, d_vocab)`` product).
    """
    w_u = f32(ds["W_U"])
    return xr.apply_ufunc(
        _take_columns,
        ds["tokens"],
        w_u,
        input_core_dims=[["pos"], ["d_model", "d_vocab"]],
        output_core_dims=[["pos", "d_model"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"allow_rechunk": True, "output_sizes": {"d_model": w_u.sizes["d_model"]}},
    )


def not_bos(ds: xr.Dataset) -> xr.DataArray:
    """(batch, pos) float32: 1 where the token is not BOS (pad == BOS counts as BOS, as in the seed)."""
    bos = bos_id(ds)
    tokens = ds["tokens"]
    if bos is None:
        return xr.ones_like(tokens, dtype=np.float32)
    return (tokens != bos).astype(np.float32)


def source_coefficients(ds: xr.Dataset, only_negative: bool = False) -> xr.DataArray:
    """``coef[batch, layer, head, key_pos] = (v @ W_O[L, h]) . W_U[:, tokens[b, k]]``."""
    v = per_head(f32(ds["v"]), ds)  # batch, layer, pos, head, d_head
    w_ou = xr.dot(f32(ds["W_O"]), unembed_columns(ds), dim="d_model")  # layer, head, d_head, batch, pos
    coef = xr.dot(v, w_ou, dim="d_head")
    if only_negative:
        coef = coef.where(coef < 0, 0.0)
    return coef.rename(pos="key_pos").transpose("batch", "layer", "head", "key_pos")


def copy_suppression(ds: xr.Dataset, only_negative: bool = False) -> xr.Dataset:
    """Per-position, per-sequence and mean source-suppression scores of every head."""
    require(ds, REQUIRES, "copy-suppression")
    coef = source_coefficients(ds, only_negative)
    keep = not_bos(ds)
    mask = keep.rename(pos="query_pos") * keep.rename(pos="key_pos")
    a = f32(ds["pattern"]) * mask  # batch, layer, head, query_pos, key_pos
    inv_scale = 1.0 / ds["ln_final_scale"].astype(np.float32).rename(pos="query_pos")
    per_position = coef * xr.dot(a, inv_scale, dim="query_pos")
    attn_per_src = a.sum("query_pos")
    per_sequence = (per_position * attn_per_src).sum("key_pos") / attn_per_src.sum("key_pos")
    score = per_sequence.mean("batch")
    out = xr.Dataset(
        {
            "per_position": per_position.rename(key_pos="pos").transpose("layer", "head", "batch", "pos"),
            "per_sequence": per_sequence.transpose("layer", "head", "batch"),
            "score": score.transpose("layer", "head"),
        }
    )
    out.attrs["only_negative"] = int(only_negative)
    return out


def summary(res: xr.Dataset) -> pd.DataFrame:
    return head_table(res["score"], "score", ascending=True)


def plot(res: xr.Dataset, folder: Path) -> list[Path]:
    score = res["score"]
    return layer_head_heatmaps(
        [score * (score < 0)],
        ["mean over sequences (negative part)"],
        "Source suppression scores",
        folder / "copy_suppression",
    )


SPEC = AnalyzerSpec(
    name="copy-suppression",
    func=copy_suppression,
    requires=REQUIRES,
    summary=summary,
    plot=plot,
    doc="How much each head suppresses the logit of the token it attends to (seed 000, Part 1).",
)
