"""The mathematics every analyzer shares, in one place: norms, softmax, top-k, a head's direct effect on a
logit, unembedding columns, the kv-head map. Named-dim xarray functions unless the name says numpy.

No torch, no model: everything is computed from a store's Dataset (``ds.hs`` gives its config).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import xarray as xr

from headstore.store_schema import HeadstoreError
from headstore.store_schema.attention import softcap as softcap
from headstore.store_schema.layout import FIELDS
from headstore.store_schema.read.accessor import final_logits as final_logits
from headstore.store_schema.read.accessor import matmul_rows as matmul_rows
from headstore.store_schema.read.accessor import normalize_final as normalize_final
from headstore.store_schema.selection import check_all_heads
from headstore.store_schema.selection import sequence_lengths as sequence_lengths

# The extract option that stores each variable (for error messages).
EXTRACT_OPTION = {name: f"--fields default,{name}" for name in FIELDS} | {
    name: "--grad METRIC --grad-ig STEPS --corrupt DATA" for name in FIELDS if name.startswith("ig_")
}


def require(ds: xr.Dataset, names: Iterable[str], analyzer: str) -> None:
    """Refuse a Dataset without its ``layer`` dim (``ds.sel(layer=1)`` drops it; every analyzer works per
    layer), one holding part of the model's heads (``ds.isel(head=...)``: ``check_all_heads``), then one lacking
    ``names``, naming the ``extract`` option that stores what is missing."""
    if "layer" not in ds.dims:
        one = ds.coords["layer"].values if "layer" in ds.coords else None
        keep = f"ds.sel(layer=[{int(one)}])" if one is not None and one.ndim == 0 else "ds.sel(layer=[L])"
        raise HeadstoreError(
            f"{analyzer}: ds has no layer dimension (selecting one layer drops it): keep it with {keep}"
        )
    check_all_heads(ds, analyzer)
    missing = [n for n in names if n not in ds]
    if missing:
        hint = "; ".join(f"{n}: extract with {EXTRACT_OPTION.get(n, 'a newer headstore')}" for n in missing)
        raise HeadstoreError(f"{analyzer} needs {', '.join(missing)}, which this store lacks ({hint})")


def f32(da: xr.DataArray) -> xr.DataArray:
    """Upcast before any contraction (float16 matmul on CPU is ~300x slower)."""
    return da if da.dtype == np.float32 else da.astype(np.float32)


def kv_index(ds: xr.Dataset) -> xr.DataArray:
    """(head,) -> kv head read by each query head: ``h // (n_heads // n_kv_heads)``."""
    cfg = ds.hs.config
    return xr.DataArray(np.arange(cfg.n_heads) // cfg.group_size, dims="head")


def per_head(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Map a ``kv_head`` array (v, k, W_V, W_K, b_V, b_K) onto query heads (dim ``head``).

    One dask chunk along ``head`` (the gather would otherwise split it per kv head, multiplying the
    tasks of everything downstream)."""
    out = da.isel(kv_head=kv_index(ds))
    return out.chunk({"head": -1}) if out.chunks is not None else out


def lead_axes(x: np.ndarray, n_core: int, n_loop: int = 2) -> np.ndarray:
    """Give ``x`` exactly ``n_loop`` leading (loop) axes, adding size-1 ones in front.

    Inside ``xr.apply_ufunc`` an input lacking a loop dim gets a size-1 axis for it, except for
    the leading ones: this adds those, so every block sees the same (batch, layer) axes."""
    missing = n_loop - (x.ndim - n_core)
    return x.reshape((1,) * missing + x.shape) if missing else x


def normalize(resid: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Folded LN / RMSNorm with the scale recomputed from ``resid`` (over ``d_model``):
    LN ``(x - mean x) / sqrt(mean (x - mean x)^2 + eps)``, RMS ``x / sqrt(mean x^2 + eps)``."""
    cfg = ds.hs.config
    x = f32(resid)
    if cfg.normalization_type == "LN":
        x = x - x.mean("d_model")
    return x / np.sqrt((x * x).mean("d_model") + np.float32(cfg.eps))


def normalize_rows(x: np.ndarray, ds: xr.Dataset, rows: int = 1024) -> np.ndarray:
    """numpy :func:`normalize` along the last axis (float64 for the variance), a block of rows at a time
    (no float64 temporaries the size of a ``(d_vocab, d_model)`` matrix)."""
    cfg = ds.hs.config
    ln = cfg.normalization_type == "LN"

    def block(b: np.ndarray) -> np.ndarray:
        if ln:
            b = b - b.mean(-1, keepdims=True)
        return (b / np.sqrt((b.astype(np.float64) ** 2).mean(-1, keepdims=True) + cfg.eps)).astype(np.float32)

    if x.ndim != 2 or x.shape[0] <= rows:
        return block(x)
    out = np.empty(x.shape, np.float32)
    for i in range(0, x.shape[0], rows):
        out[i : i + rows] = block(x[i : i + rows])
    return out


def logits(ds: xr.Dataset, resid: xr.DataArray | None = None, *, capped: bool = True) -> xr.DataArray:
    """``logits[..., d_vocab] = cap(normalize_final(resid_final) @ W_U + b_U)`` with ln_final_scale frozen; ``cap``
    is the model's final soft-cap (none on most models), left out with ``capped=False``."""
    resid = ds["resid_final"] if resid is None else resid
    return final_logits(ds, resid, ds["ln_final_scale"], capped=capped)


def logits_kind(ds: xr.Dataset) -> str:
    """What a linear decomposition of the logits decomposes: ``"model"`` (the model's logits), or on models with a
    final soft-cap ``"pre-softcap (model logit = c * tanh(logit / c), c = ...)"`` (for ``attrs["logits"]``)."""
    cap = ds.hs.config.final_logit_softcap
    return f"pre-softcap (model logit = c * tanh(logit / c), c = {cap:g})" if cap > 0 else "model"


POST_NORM_NEEDS = ("ln1_post_scale", "ln1_post_w")


def head_writes(ds: xr.Dataset, analyzer: str) -> tuple[xr.DataArray, xr.DataArray | None]:
    """``(W_write, inv_post)``: head ``(L, h)`` adds ``z[b, L, q, h] @ W_write[L, h] * inv_post[b, L, q]`` to the
    residual stream (``inv_post`` None: 1).

    Pre-norm models: ``W_write = W_O``. Post-norm models (``config.post_norm``: Gemma-2, OLMo-2) normalise each
    layer's attention output before adding it, ``g * attn_out / ln1_post_scale``; with that scale frozen (as
    ``ln_final_scale`` is for the logits) a head adds exactly ``z @ (W_O * g) / ln1_post_scale``: ``W_write =
    W_O * ln1_post_w``, ``inv_post = 1 / ln1_post_scale``.
    """
    w_o = f32(ds["W_O"])
    if not ds.hs.config.post_norm:
        return w_o, None
    missing = [n for n in POST_NORM_NEEDS if n not in ds]
    if missing:
        raise HeadstoreError(
            f"{analyzer}: this post-norm model adds each head's output through a norm whose scale this store lacks "
            f"({', '.join(missing)}): re-extract with the default fields"
        )
    return w_o * f32(ds["ln1_post_w"]), 1.0 / f32(ds["ln1_post_scale"])


def next_tokens(ds: xr.Dataset) -> xr.DataArray:
    """(batch, pos) token at pos+1; -1 where there is none: at the last position and, on a right-padded store
    (one with a ``length`` column), wherever ``pos + 1 >= length[b]`` (the next token is padding)."""
    nxt = ds["tokens"].shift(pos=-1, fill_value=-1).astype(np.int64)
    if "length" not in ds:
        return nxt
    has_next = real_positions(ds).shift(pos=-1, fill_value=False)  # the token at pos + 1 is real
    return nxt.where(has_next, -1).transpose(*nxt.dims)


def causal_softmax(scores: xr.DataArray, valid: xr.DataArray, dim: str) -> xr.DataArray:
    """``softmax_dim(scores)`` over the entries where ``valid`` (the others get exactly 0)."""
    top = scores.where(valid).max(dim)
    w = xr.where(valid, np.exp(scores - top), np.float32(0))
    return w / w.sum(dim)


def attention_scores(q: xr.DataArray, k: xr.DataArray, scale: float | None = None) -> xr.DataArray:
    """``q . k * scale`` over ``d_head`` (``scale`` None: ``1 / sqrt(d_head)``)."""
    if scale is None:
        return xr.dot(q, k, dim="d_head", optimize=True) / np.float32(math.sqrt(q.sizes["d_head"]))
    return xr.dot(q, k, dim="d_head", optimize=True) * np.float32(scale)


def rotate(q: xr.DataArray, cos: xr.DataArray, sin: xr.DataArray, style: str = "half") -> xr.DataArray:
    """HF rotary on the first ``d_rot`` dims: ``q*cos + turn(q)*sin``; ``turn`` is ``rotate_half`` (``half``:
    ``cat(-x2, x1)``, Llama, GPT-NeoX) or ``rotate_every_two`` (``interleaved``: ``(-x1, x0, -x3, x2, ...)``, GPT-J).
    Dims past ``d_rot`` pass through."""
    d_rot = cos.sizes["d_rot"]
    half = d_rot // 2
    part = q.isel(d_head=slice(0, d_rot))
    if style == "interleaved":
        perm = np.arange(d_rot) ^ 1  # 1, 0, 3, 2, ...
        sign = np.where(np.arange(d_rot) % 2 == 0, -1, 1).astype(np.float32)
        turned = part.isel(d_head=perm) * xr.DataArray(sign, dims="d_head")
        turned = turned.chunk({"d_head": -1}) if turned.chunks is not None else turned
    else:
        turned = xr.concat([-part.isel(d_head=slice(half, d_rot)), part.isel(d_head=slice(0, half))], dim="d_head")
    cos, sin = f32(cos).rename(d_rot="d_head"), f32(sin).rename(d_rot="d_head")
    out = part * cos + turned * sin
    if d_rot < q.sizes["d_head"]:
        out = xr.concat([out, q.isel(d_head=slice(d_rot, None))], dim="d_head")
    return out.transpose(*q.dims)


def rms_normalize(x: xr.DataArray, dims: str | list[str], eps: float) -> xr.DataArray:
    """``x / sqrt(mean_dims(x^2) + eps)`` (RMSNorm without its gain)."""
    return x / np.sqrt((x * x).mean(dims) + np.float32(eps))


ARGMAX_TOP_K = 16  # up to this k, k argmax passes beat one argpartition over d_vocab (docs/benchmarks.md)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy: (rows, n) -> (indices, values) of the k largest per row, largest first up to k = 16. Overwrites ``x``."""
    if k > ARGMAX_TOP_K:
        idx = np.argpartition(x, x.shape[-1] - k, axis=-1)[:, -k:]
        return idx, np.take_along_axis(x, idx, -1)
    rows = np.arange(x.shape[0])
    idx = np.empty((x.shape[0], k), np.int64)
    vals = np.empty((x.shape[0], k), x.dtype)
    for j in range(k):
        idx[:, j] = x.argmax(-1)
        vals[:, j] = x[rows, idx[:, j]]
        x[rows, idx[:, j]] = -np.inf
    return idx, vals


def head_unembedder(w_o: np.ndarray, w_u: np.ndarray, n: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """numpy ``(x, out) -> x @ W_O[L, h] @ W_U`` into ``out``, for ``n`` rows of ``x`` in all (taken a tile at a time),
    multiplied in the cheaper order: ``(x @ W_O) @ W_U`` costs ``n d_model (d_head + d_vocab)`` flops,
    ``x @ (W_O @ W_U)`` costs ``d_head d_vocab (d_model + n)`` (``W_O @ W_U`` made here, once): the second wins once
    ``n`` is above about ``d_head``."""
    (d_head, d_model), d_vocab = w_o.shape, w_u.shape[1]
    if d_head * d_vocab * (d_model + n) < n * d_model * (d_head + d_vocab):
        w_ou = w_o @ w_u
        return lambda x, out: np.matmul(x, w_ou, out=out)
    return lambda x, out: np.matmul(x @ w_o, w_u, out=out)


def logit_direction(ds: xr.Dataset, target: xr.DataArray) -> xr.DataArray:
    """``u = W_U[:, target]`` (dims ``d_model`` + target's), centred over ``d_model`` on LN models.

    With ln_final's scale frozen, ``logit_t = normalize_final(x) . W_U[:, t]`` and
    ``(x - mean x) . w = x . (w - mean w)``: so ``x . u / scale`` is exactly ``x``'s share of the logit.
    """
    u = f32(ds["W_U"]).isel(d_vocab=target)
    return u - u.mean("d_model") if ds.hs.config.normalization_type == "LN" else u


def source_contributions(ds: xr.Dataset, dest: xr.DataArray, target: xr.DataArray) -> xr.DataArray:
    """(batch, layer, head, key_pos) each head's direct effect on logit ``target[b]`` at position ``dest[b]``,
    source by source::

        contrib = pattern[b, L, h, dest, k] * ((v[b, L, k, kv(h)] - b_V[L, kv(h)]) @ W_write[L, h] . u[b])
                  * inv_post[b, L, dest] / ln_final_scale[b, dest]

    with ``u = logit_direction(target)`` and ``W_write``, ``inv_post`` from :func:`head_writes` (``W_O`` and 1
    except on post-norm models). ``b_V`` is zero on stores extracted with ``fold_value_biases``; an unfolded
    one goes to the head's bias term (``b_V @ W_O``: not attributable to a source). Lazy. The logit is the
    pre-soft-cap one on soft-capped models (a linear decomposition).
    """
    u = logit_direction(ds, target)  # (d_model, batch)
    inv = 1.0 / f32(ds["ln_final_scale"]).isel(pos=dest)  # (batch,)
    w_write, inv_post = head_writes(ds, "logit attribution")
    if inv_post is not None:
        inv = inv * inv_post.isel(pos=dest)  # (batch, layer)
    v = f32(per_head(ds["v"], ds))
    if "b_V" in ds:
        v = v - f32(per_head(ds["b_V"], ds))
    wou = xr.dot(w_write, u, dim="d_model", optimize=True)  # (layer, head, d_head, batch)
    through = xr.dot(v, wou, dim="d_head", optimize=True).rename(pos="key_pos")  # (batch, layer, key_pos, head)
    pat = f32(ds["pattern"]).isel(query_pos=dest)  # (batch, layer, head, key_pos)
    contrib = (pat * through * inv).transpose("batch", "layer", "head", "key_pos")
    return contrib.drop_vars([c for c in ("query_pos", "pos", "d_vocab") if c in contrib.coords])


def _take_columns(tokens: np.ndarray, w_u: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """tokens (batch, pos), w_u (d_model, d_vocab) or its one block in a list -> (batch, pos, d_model)."""
    (w,) = w_u if isinstance(w_u, list) else [w_u]
    return np.moveaxis(w[:, tokens], 0, -1).astype(np.float32, copy=False)


def unembed_columns(ds: xr.Dataset) -> xr.DataArray:
    """``(batch, pos, d_model)``: the unembedding column of each token, ``W_U[:, tokens[b, p]]``.

    Gathered blockwise along ``batch`` (never a ``(tokens, d_vocab)`` product); each block reads the
    one ``W_U`` chunk in place (``concatenate=False``: no copy of the vocabulary per block).
    """
    tokens, w_u = ds["tokens"].transpose("batch", "pos"), f32(ds["W_U"]).transpose("d_model", "d_vocab")
    dims = ("batch", "pos", "d_model")
    if tokens.chunks is None or w_u.chunks is None:
        return xr.DataArray(_take_columns(tokens.values, w_u.values), dims=dims)
    import dask.array as da

    w = w_u.data.rechunk({1: -1})
    data = da.blockwise(
        _take_columns, "bpm", tokens.data, "bp", w, "mv", dtype=np.float32, concatenate=False,
        meta=np.empty((0, 0, 0), np.float32),
    )  # fmt: skip
    return xr.DataArray(data, dims=dims, coords={c: tokens.coords[c] for c in ("batch",) if c in tokens.coords})


def bos_id(ds: xr.Dataset) -> int | None:
    tid = ds.hs.provenance.tokenizer.bos_token_id
    return None if tid is None else int(tid)


def not_bos(ds: xr.Dataset) -> xr.DataArray:
    """(batch, pos) float32: 1 where the token is not BOS (pad == BOS counts as BOS, as in the seed)."""
    bos = bos_id(ds)
    tokens = ds["tokens"]
    if bos is None:
        return xr.ones_like(tokens, dtype=np.float32)
    return (tokens != bos).astype(np.float32)


def real_positions(ds: xr.Dataset) -> xr.DataArray:
    """(batch, pos) bool: True where the position holds a real token, ``pos < length[b]`` (right-padded stores:
    own prompts, IOI); True everywhere on a store without a ``length`` column."""
    return (xr.DataArray(np.arange(ds.sizes["pos"]), dims="pos") < sequence_lengths(ds)).transpose("batch", "pos")


def strings(ds: xr.Dataset, name: str) -> np.ndarray:
    """A string variable (``split``, ``subset``...) as a fixed-width unicode array (the store may hand
    back numpy's StringDType, on which ``.astype(str)`` fails)."""
    return np.array(ds[name].values.tolist(), dtype=str)
