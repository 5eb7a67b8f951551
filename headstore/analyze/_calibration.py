"""Calibration of next-token predictions, and how it changes when one head's direct effect is removed.

Seed 003 (``measure_calibration`` / ``measure_calibration_minus_heads``), offline:

- logits at positions ``0..seq-2`` are recomputed from ``resid_final`` with ``ln_final_scale``
  frozen (``_maths.logits``); ``probs = softmax``; the top-k probabilities and their indices are
  taken; a top-k entry is *correct* when its index is the next token;
- only real next-token predictions count: on a right-padded store (own prompts, IOI; its ``length``
  column) position ``q`` of sequence ``b`` counts only if ``q + 1 < length[b]`` (``_maths.next_tokens``
  is -1 elsewhere), so padded positions, and the last real token (whose next token is padding), are
  left out; a store without ``length`` counts every position ``0..seq-2``, as the seed;
- bins are ``[i/n, (i+1)/n)`` (edges in float32, as the seed's ``t.arange(n + 1) / n``), so a
  probability of exactly 1.0 falls in no bin, as in the seed;
- ``bucket_frequency`` / ``bucket_correct_frequency`` are counts summed over every batch;
  ``accuracy = correct / frequency``; ``variance = p_mid (1 - p_mid) / frequency`` (both NaN in an
  empty bin, where the seed's variance would be inf);
- for head ``(L, h)`` the same is done on ``logits - (result[b, L, q, h] / ln_final_scale) @ W_U``
  (the seed's direct-effect removal: the head's output is taken out through the frozen scale, and
  not centred, exactly as in the seed), with ``result = z @ W_O[L, h]`` multiplied in the cheaper
  order (``_maths.head_unembedder``);
- the model's own non-linearities: under a final soft-cap (Gemma-2) the head is removed from the pre-cap
  logits and the probabilities are taken of ``c * tanh(logits / c)``, the model's logits; on post-norm
  models (Gemma-2, OLMo-2) a head writes through its layer's frozen post-attention norm
  (``W_O * ln1_post_w``, ``ln_final_scale * ln1_post_scale``: ``_maths.head_writes``).

Counts are accumulated blockwise: one dask task per (batch block, layer), which holds that block's baseline
logits and a few rows of one head's ablated logits at a time (never all heads' ``tokens x d_vocab``).

``overconfidence(accuracy)`` is the seed's ``calculate_overconfidence``: with
``perfect = (arange(n) + 0.5) / n``, ``f = accuracy - perfect`` and ``x = 0.5 - perfect`` it is
``sum(f x) / sum(x x)``, except that empty bins (NaN accuracy; the seed would return NaN) are
left out of *both* sums; the number of empty bins is reported beside it.

Note on the seed's docstring: it says ``t.linspace(-5, 5, 100).sigmoid()`` scores "about -0.7",
but the seed's own formula gives **-0.3157** for that curve. No curve with accuracies in ``[0, 1]`` can
go below -0.5 (reached by the step: accuracy 0 below p = 0.5 and 1 above it; the seed's "-1" would
need accuracy ``2p - 0.5``, negative for p < 0.25), so the docstring is a slip.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as dsa
import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from headstore.analyze import _apply, _args, _maths
from headstore.analyze._apply import vocab_rows
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Heads
from headstore.store_schema import HeadstoreError

REQUIRES = ("tokens", "resid_final", "ln_final_scale", "z", "W_O", "W_U", "b_U")


def perfect_calibration_line(n_bins: int) -> np.ndarray:
    return (np.arange(n_bins) + 0.5) / n_bins


def _overconfidence_last_axis(accuracy: np.ndarray) -> np.ndarray:
    acc = np.asarray(accuracy, dtype=np.float64)
    n = acc.shape[-1]
    perfect = perfect_calibration_line(n)
    valid = ~np.isnan(acc)
    f = np.where(valid, acc - perfect, 0.0)
    x = np.where(valid, 0.5 - perfect, 0.0)
    num = (f * x).sum(-1)
    den = (x * x).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def overconfidence(accuracy: Any) -> float:
    """Seed ``calculate_overconfidence`` with empty (NaN) bins left out of both sums.

    0 for a perfectly calibrated curve, 1 for the constant 0.5 curve, -0.5 (the minimum for
    accuracies in [0, 1]) for the step curve 0 below p = 0.5 and 1 above; NaN when every bin is empty.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    if acc.ndim != 1:
        raise HeadstoreError(f"overconfidence takes a 1-d accuracy curve, got shape {acc.shape}")
    return float(_overconfidence_last_axis(acc))


def n_empty_bins(accuracy: Any) -> int:
    return int(np.isnan(np.asarray(accuracy, dtype=np.float64)).sum())


def _bin_counts(logit_rows: np.ndarray, nxt: np.ndarray, top_k: int, edges: np.ndarray) -> np.ndarray:
    """(tokens, d_vocab) float32 logits, (tokens,) next ids (all real) -> (2, n_bins): [frequency, correct].

    The top-k probabilities are the top-k logits' ``exp(logit - max) / sum(exp(logits - max))``.
    Overwrites ``logit_rows``.
    """
    n_bins = edges.size - 1
    x = logit_rows
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    total = x.sum(-1, keepdims=True)
    k = min(top_k, x.shape[-1])
    idx, vals = _maths.top_k(x, k)
    vals /= total
    correct = idx == nxt[:, None]
    b = np.searchsorted(edges, vals, side="right") - 1  # vals in [edges[b], edges[b+1])
    ok = (b >= 0) & (b < n_bins)
    freq = np.bincount(b[ok], minlength=n_bins)
    corr = np.bincount(b[ok & correct], minlength=n_bins)
    return np.stack([freq, corr]).astype(np.int64)


def _real_rows(lg: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """``(rows, lg2, nxt1)``: the flat (b q) rows with a real next token (None: all), every row's logits (float32,
    (b q, d_vocab), not copied where they are so already) and the real rows' next ids."""
    nxt1 = nxt.reshape(nxt.size)
    rows = np.flatnonzero(nxt1 >= 0) if (nxt1 < 0).any() else None
    lg2 = np.ascontiguousarray(lg, dtype=np.float32).reshape(nxt.size, -1)
    return rows, lg2, (nxt1 if rows is None else nxt1[rows])


def _base_counts(lg: np.ndarray, nxt: np.ndarray, top_k: int, edges: np.ndarray, cap: float = 0.0) -> np.ndarray:
    """One batch block -> (1, 2, n_bins): the baseline's counts. ``lg`` (b, q, d_vocab) pre-cap logits, ``nxt``
    (b, q) with -1 where there is no real next token (left out)."""
    rows, lg2, nxt1 = _real_rows(lg, nxt)
    out = np.zeros((1, 2, edges.size - 1), np.int64)
    if len(nxt1):
        out[0] = _bin_counts(_maths.softcap(lg2.copy() if rows is None else lg2[rows], cap), nxt1, top_k, edges)
    return out


def _layer_counts(
    lg: np.ndarray,
    z: np.ndarray,
    scale: np.ndarray,
    nxt: np.ndarray,
    W_O: np.ndarray,
    W_U: np.ndarray,
    heads: list[int],
    top_k: int,
    edges: np.ndarray,
    cap: float = 0.0,
) -> np.ndarray:
    """One (batch block, layer) -> (len(heads), 2, n_bins) counts with each head's direct effect removed.

    ``lg`` (b, q, d_vocab) pre-cap logits, ``z`` (b, 1, q, head, d_head) of the layer, ``scale`` (b, q) or (b, 1, q)
    (the layer's ``ln_final_scale * ln1_post_scale`` on post-norm models), ``nxt`` (b, q) with -1 where there is no
    real next token (left out), ``W_O`` (1, head, d_head, d_model) the layer's write weights, ``W_U`` (d_model, d_vocab);
    ``cap``: the final soft-cap applied to each variant's logits (0: none). BLAS runs single-threaded: dask runs
    one block per core.
    """
    rows, lg2, nxt1 = _real_rows(lg, nxt)
    out = np.zeros((len(heads), 2, edges.size - 1), np.int64)
    W_O = W_O.reshape(W_O.shape[-3], W_O.shape[-2], W_O.shape[-1])  # a (1, head, ...) block: the layer's
    n, tile = len(nxt1), _apply.VOCAB_ROW_TILE
    if n == 0:
        return out
    inv = (1.0 / scale.astype(np.float32)).reshape(-1, 1)
    z2 = z.astype(np.float32).reshape(nxt.size, z.shape[-2], z.shape[-1])
    inv, z2 = (inv, z2) if rows is None else (inv[rows], z2[rows])
    buf = np.empty((min(n, tile), W_U.shape[1]), np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        for i, h in enumerate(heads):
            zh = z2[:, h] * inv  # (n_real, d_head): result / scale = zh @ W_O[h]
            unembed = _maths.head_unembedder(W_O[h], W_U, n)
            for r in range(0, n, tile):  # the vocabulary-sized work a few rows at a time, in cache
                bf = buf[: min(tile, n - r)]
                unembed(zh[r : r + tile], bf)
                np.subtract(lg2[r : r + tile] if rows is None else lg2[rows[r : r + tile]], bf, out=bf)
                out[i] += _bin_counts(_maths.softcap(bf, cap), nxt1[r : r + tile], top_k, edges)
    return out


def _counts(ds: xr.Dataset, head_idx: list[tuple[int, int]], top_k: int, n_bins: int) -> Any:
    """(variant, 2, bin) counts of predictions and of correct ones per bin: the baseline, then each head removed.

    One task per batch block for the baseline and one per (batch block, layer) for that layer's chosen heads;
    batch blocks group the store's chunks (``_apply.vocab_rows``)."""
    n_pos = ds.sizes["pos"]
    q = slice(0, n_pos - 1)
    rows = vocab_rows(ds)
    lg = _maths.logits(ds, capped=False).isel(pos=q).transpose("batch", "pos", "d_vocab")
    lg_d = dsa.asarray(lg.data).rechunk({0: rows, 1: -1, 2: -1})
    batch_chunks = lg_d.chunks[0]
    z = dsa.asarray(ds["z"].isel(pos=q).transpose("batch", "layer", "pos", "head", "d_head").data)
    z = z.rechunk({0: batch_chunks, 1: 1, 2: -1, 3: -1, 4: -1})
    w_write, inv_post = _maths.head_writes(ds, "calibration")
    scale_da = _maths.f32(ds["ln_final_scale"])
    if inv_post is not None:  # post-norm: ln_final_scale * ln1_post_scale per layer
        scale_da = (scale_da / inv_post).transpose("batch", "layer", "pos")
    scale = dsa.asarray(scale_da.isel(pos=q).transpose("batch", ..., "pos").data)
    per_layer = scale.ndim == 3
    scale = scale.rechunk({0: batch_chunks, **({1: 1, 2: -1} if per_layer else {1: -1})})
    nxt = dsa.asarray(_maths.next_tokens(ds).isel(pos=q).transpose("batch", "pos").data)  # -1: no real next
    nxt = nxt.rechunk({0: batch_chunks, 1: -1})
    W_U = dask.delayed(np.ascontiguousarray)(_maths.f32(ds["W_U"]).transpose("d_model", "d_vocab").data)
    W_O = _maths.f32(w_write).transpose("layer", "head", "d_head", "d_model").data
    edges = np.arange(n_bins + 1, dtype=np.float32) / np.float32(n_bins)
    cap = ds.hs.config.final_logit_softcap
    by_layer: dict[int, list[int]] = {}
    for li, h in head_idx:
        by_layer.setdefault(li, []).append(h)
    order = [(li, h) for li, hs in by_layer.items() for h in hs]  # the rows of the per-layer tasks' results

    def part(task: Any, n: int) -> Any:
        return dsa.from_delayed(task, shape=(n, 2, n_bins), dtype=np.int64)

    # each block once as a Delayed (a dask array handed to several delayed calls is optimised, and computed, per call)
    lg_b, z_b, scale_b, nxt_b, w_o = (a.to_delayed() for a in (lg_d, z, scale, nxt, dsa.asarray(W_O).rechunk({0: 1})))
    base, heads = [], []
    for i in range(len(batch_chunks)):
        base.append(part(dask.delayed(_base_counts, pure=True)(lg_b[i, 0, 0], nxt_b[i, 0], top_k, edges, cap), 1))
        heads.append(dsa.concatenate([
            part(dask.delayed(_layer_counts, pure=True)(
                lg_b[i, 0, 0], z_b[i, li, 0, 0, 0], scale_b[i, li, 0] if per_layer else scale_b[i, 0], nxt_b[i, 0],
                w_o[li, 0, 0, 0], W_U, hs, top_k, edges, cap,
            ), len(hs))
            for li, hs in by_layer.items()
        ]))  # fmt: skip
    head_counts = dsa.stack(heads).sum(0)[[order.index(x) for x in head_idx]]
    return dsa.concatenate([dsa.stack(base).sum(0), head_counts])


def _curves(counts: Any, n_bins: int) -> tuple[xr.Dataset, dict[str, xr.DataArray]]:
    """The baseline's curve and overconfidence, and each variant's per-bin arrays (for the per-head grid)."""
    bins = np.arange(n_bins)
    p_mid = perfect_calibration_line(n_bins)
    c = xr.DataArray(counts, dims=("variant", "kind", "bin"), coords={"bin": bins})
    freq, corr = c.isel(kind=0), c.isel(kind=1)
    accuracy = (corr / freq.where(freq > 0)).astype(np.float64)
    variance = xr.DataArray(p_mid * (1 - p_mid), dims="bin", coords={"bin": bins}) / freq.where(freq > 0)
    over = xr.apply_ufunc(
        _overconfidence_last_axis, accuracy, input_core_dims=[["bin"]], dask="parallelized", output_dtypes=[np.float64]
    )
    empty = (freq == 0).sum("bin")

    out = xr.Dataset(
        {
            "p_mid": ("bin", p_mid),
            "bucket_frequency": freq.isel(variant=0, drop=True),
            "bucket_correct_frequency": corr.isel(variant=0, drop=True),
            "accuracy": accuracy.isel(variant=0, drop=True),
            "variance": variance.isel(variant=0, drop=True),
            "overconfidence": over.isel(variant=0, drop=True),
            "n_empty_bins": empty.isel(variant=0, drop=True),
        },
        coords={"bin": bins},
    )

    return out, {"freq": freq, "corr": corr, "accuracy": accuracy, "variance": variance, "over": over, "empty": empty}


def _per_head(
    out: xr.Dataset, v: dict[str, xr.DataArray], head_idx: list[tuple[int, int]], layers: np.ndarray, n_heads: int
) -> None:
    """Scatter the selected heads' variants onto a full (layer, head) grid of ``out`` (NaN / -1 elsewhere)."""
    freq, corr, accuracy, variance, over, empty = (
        v[k] for k in ("freq", "corr", "accuracy", "variance", "over", "empty")
    )
    flat = np.full(len(layers) * n_heads, len(head_idx) + 1)  # index of an all-missing pad variant
    for i, (li, h) in enumerate(head_idx):
        flat[li * n_heads + h] = 1 + i

    def grid(var: xr.DataArray, fill: float) -> xr.DataArray:
        padded = xr.concat([var, xr.full_like(var.isel(variant=[0]), fill)], "variant")
        g = padded.isel(variant=xr.DataArray(flat.reshape(len(layers), n_heads), dims=("layer", "head")))
        return g.assign_coords(layer=layers)

    out["head_bucket_frequency"] = grid(freq, -1).transpose("layer", "head", "bin")
    out["head_bucket_correct_frequency"] = grid(corr, -1).transpose("layer", "head", "bin")
    out["head_accuracy"] = grid(accuracy, np.nan).transpose("layer", "head", "bin")
    out["head_variance"] = grid(variance, np.nan).transpose("layer", "head", "bin")
    out["head_overconfidence"] = grid(over, np.nan).transpose("layer", "head")
    out["head_n_empty_bins"] = grid(empty, -1).transpose("layer", "head")
    out["overconfidence_change"] = out["head_overconfidence"] - out["overconfidence"]
    out["overconfidence_ratio"] = out["head_overconfidence"] / out["overconfidence"] - 1
    out["selected"] = xr.DataArray((flat <= len(head_idx)).reshape(len(layers), n_heads), dims=("layer", "head"))


def calibration(ds: xr.Dataset, *, top_k: int = 3, n_bins: int = 50, heads: _args.Heads = "all") -> xr.Dataset:
    """Calibration curve and overconfidence, baseline and with each chosen head's direct effect removed, over the
    real next-token predictions (``q + 1 < length[b]`` on a right-padded store: padding never counts).

    ``heads``: ``"all"`` or a list of ``(layer, head)``; the others get NaN in the ``head_*`` variables.
    """
    _maths.require(ds, REQUIRES, "calibration")
    if n_bins < 1 or top_k < 1:
        raise HeadstoreError("calibration needs n_bins >= 1 and top_k >= 1")
    n_pos = ds.sizes["pos"]
    if n_pos < 2:
        raise HeadstoreError("calibration needs sequences of at least 2 tokens")
    layers = ds["layer"].values
    n_heads = ds.sizes["head"]
    selected = _args.heads(ds, heads, "heads")
    if not selected:
        raise HeadstoreError("calibration: heads is empty: pass 'all' or at least one (layer, head)")
    layer_pos = {int(L): i for i, L in enumerate(layers)}
    head_idx = [(layer_pos[L], h) for L, h in selected]

    counts = _counts(ds, head_idx, top_k, n_bins)  # (variant, 2, bin)
    out, per_variant = _curves(counts, n_bins)
    _per_head(out, per_variant, head_idx, layers, n_heads)
    out.attrs.update(
        {
            "analyzer": "calibration",
            "top_k": int(top_k),
            "n_bins": int(n_bins),
            "heads": heads if isinstance(heads, str) else ",".join(f"{L}.{h}" for L, h in selected),
        }
    )
    return out


SPEC = AnalyzerSpec(
    "calibration", calibration, REQUIRES,
    doc="Calibration curve and overconfidence; change when each head's direct effect is removed (seed 003).",
    params={"top_k": int, "n_bins": int, "heads": Heads},
)  # fmt: skip
register_analyzer(SPEC)
