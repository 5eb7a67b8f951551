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

``target``: a token id (int or digit string), ``"next"`` (the true next token ``tokens[b, dest+1]``),
the name of a per-sequence integer column of the store (e.g. ``io_token`` on IOI stores), or a
token string looked up exactly in the store's ``vocab`` (an error when absent or ambiguous).

``dest``: a position (negative counts from the end), or ``-1`` (default) which means the
per-sequence ``end_pos`` column when the store has one (IOI: the last prompt token), else the last
position. With ``target="next"`` and no ``end_pos`` column, ``-1`` means the last position that has
a next token (``seq_len - 2``); a ``dest`` with no next token is an error. On IOI stores the token
after ``end_pos`` is padding, so ask for ``target="io_token"`` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr

from headstore.analyze._ops import f32, normalize_final, per_head, require
from headstore.analyze._plots import head_table, layer_head_heatmaps, save_html
from headstore.analyze._registry import AnalyzerSpec
from headstore.store_schema import HeadstoreError, provenance

REQUIRES = ("tokens", "pattern", "v", "result", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U", "b_V")


def _vocab(ds: xr.Dataset) -> np.ndarray:
    """The store's token strings as a plain object array (the store may hand back numpy StringDType)."""
    return np.array([str(x) for x in np.asarray(ds["vocab"].values).tolist()], dtype=object)


def resolve_dest(ds: xr.Dataset, dest: int, target: Any) -> np.ndarray:
    """(batch,) destination positions (see the module docstring for the rule)."""
    n_batch, n_pos = ds.sizes["batch"], ds.sizes["pos"]
    if dest == -1 and "end_pos" in ds:
        out = np.asarray(ds["end_pos"].values, dtype=np.int64)
    elif dest == -1 and str(target) == "next":
        out = np.full(n_batch, n_pos - 2, np.int64)
    else:
        if not -n_pos <= dest < n_pos:
            raise HeadstoreError(f"dest {dest} is outside the sequence (seq_len {n_pos})")
        out = np.full(n_batch, dest % n_pos, np.int64)
    if ((out < 0) | (out >= n_pos)).any():
        raise HeadstoreError(f"destination positions {sorted(set(out.tolist()))} fall outside seq_len {n_pos}")
    return out


def resolve_target(ds: xr.Dataset, target: Any, dest: np.ndarray) -> np.ndarray:
    """(batch,) target token ids."""
    n_batch, n_pos = ds.sizes["batch"], ds.sizes["pos"]
    d_vocab = ds.sizes["d_vocab"]
    if isinstance(target, (int, np.integer)) or (isinstance(target, str) and target.strip().isdigit()):
        tid = int(target)
        if not 0 <= tid < d_vocab:
            raise HeadstoreError(f"target token id {tid} is outside the vocabulary (d_vocab {d_vocab})")
        return np.full(n_batch, tid, np.int64)
    if not isinstance(target, str):
        raise HeadstoreError(f"target {target!r}: give a token id, a token string, a column name or 'next'")
    if target == "next":
        if (dest + 1 >= n_pos).any():
            bad = np.flatnonzero(dest + 1 >= n_pos)[:5].tolist()
            raise HeadstoreError(
                f"target 'next' needs a token after dest, but sequences {bad} have dest at the last position: "
                "pass a smaller dest, or a token / column target (e.g. io_token)"
            )
        toks = np.asarray(ds["tokens"].values)
        return toks[np.arange(n_batch), dest + 1].astype(np.int64)
    if target in ds and ds[target].dims == ("batch",) and np.issubdtype(ds[target].dtype, np.integer):
        out = np.asarray(ds[target].values, dtype=np.int64)
        if ((out < 0) | (out >= d_vocab)).any():
            raise HeadstoreError(f"column {target!r} holds ids outside the vocabulary")
        return out
    if "vocab" not in ds:
        raise HeadstoreError(f"target {target!r} is a token string but this store has no 'vocab' to look it up in")
    hits = np.flatnonzero(_vocab(ds) == target)
    if hits.size == 0:
        raise HeadstoreError(f"token string {target!r} is not in this store's vocab: give a token id instead")
    if hits.size > 1:
        raise HeadstoreError(f"token string {target!r} is ambiguous (ids {hits[:10].tolist()}): give a token id")
    return np.full(n_batch, int(hits[0]), np.int64)


def logit_attribution(ds: xr.Dataset, target: str = "next", dest: int = -1) -> xr.Dataset:
    """Decompose the target logit at ``dest`` into (head, source position) terms plus the rest."""
    require(ds, REQUIRES, "logit-attribution")
    dest_np = resolve_dest(ds, int(dest), target)
    tgt_np = resolve_target(ds, target, dest_np)
    dest_da = xr.DataArray(dest_np, dims="batch")
    tgt_da = xr.DataArray(tgt_np, dims="batch")

    u = f32(ds["W_U"]).isel(d_vocab=tgt_da)  # (d_model, batch)
    u_c = u - u.mean("d_model") if provenance(ds).config["normalization_type"] == "LN" else u
    inv = 1.0 / f32(ds["ln_final_scale"]).isel(pos=dest_da)  # (batch,)

    b_V = f32(per_head(ds["b_V"], ds))  # (layer, head, d_head)
    W_O = f32(ds["W_O"])
    pat = f32(ds["pattern"]).isel(query_pos=dest_da)  # (batch, layer, head, key_pos)
    v = f32(per_head(ds["v"], ds)) - b_V  # (batch, layer, pos, head, d_head)
    wou = xr.dot(W_O, u_c, dim="d_model")  # (layer, head, d_head, batch)
    vproj = xr.dot(v, wou, dim="d_head").rename(pos="key_pos")  # (batch, layer, key_pos, head)
    contrib = (pat * vproj * inv).transpose("batch", "layer", "head", "key_pos")
    per = contrib.sum("key_pos")

    bvo = xr.dot(b_V, W_O, dim="d_head")  # (layer, head, d_model): the folded value bias
    res_dest = f32(ds["result"]).isel(pos=dest_da) - bvo  # (batch, layer, head, d_model)
    from_result = (xr.dot(res_dest, u_c, dim="d_model") * inv).transpose("batch", "layer", "head")
    resid = f32(ds["resid_final"]).isel(pos=dest_da)  # (batch, d_model)
    scale = f32(ds["ln_final_scale"]).isel(pos=dest_da)
    b_U = f32(ds["b_U"]).isel(d_vocab=tgt_da)
    logit = xr.dot(normalize_final(resid, scale, ds), u, dim="d_model") + b_U
    other = xr.dot(resid - res_dest.sum(["layer", "head"]), u_c, dim="d_model") * inv
    recon = logit - (per.sum(["layer", "head"]) + other + b_U)

    b_V_zero = bool((np.asarray(ds["b_V"].values) == 0).all())
    key_tokens = ds["tokens"].rename(pos="key_pos").astype(np.int64)
    out = xr.Dataset(
        {
            "contrib": contrib,
            "per_head": per,
            "per_head_from_result": from_result,
            "logit": logit,
            "residual_other": other,
            "b_U_term": b_U,
            "reconstruction_error": recon,
            "dest": dest_da,
            "target": tgt_da,
            "key_token": key_tokens,
        },
        coords={"layer": ds["layer"].values},
    )
    if "vocab" in ds:
        vocab = _vocab(ds)
        first = vocab[np.asarray(ds["tokens"].isel(batch=0).values)]
        out["key_token_str"] = xr.DataArray(np.array(first.tolist(), dtype=str), dims="key_pos")
        out["target_str"] = xr.DataArray(np.array(vocab[tgt_np].tolist(), dtype=str), dims="batch")
    out.attrs.update(
        {"analyzer": "logit-attribution", "target": str(target), "dest": int(dest), "b_V_folded": int(b_V_zero)}
    )
    return out


def summary(res: xr.Dataset) -> pd.DataFrame:
    mean = res["per_head"].mean("batch")
    df = head_table(mean, "mean_contribution", ascending=False)
    absmean = abs(res["per_head"]).mean("batch")
    df["mean_abs_contribution"] = [float(absmean.sel(layer=L).isel(head=h)) for L, h in zip(df["layer"], df["head"])]
    df["mean_logit"] = float(res["logit"].mean())
    df["mean_residual_other"] = float(res["residual_other"].mean())
    return df


def plot(res: xr.Dataset, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    target = res.attrs.get("target", "")
    paths = layer_head_heatmaps(
        [res["per_head"].mean("batch")],
        ["mean direct contribution"],
        f"Direct logit contribution of each head to target {target!r} (mean over sequences)",
        folder / "per_head",
    )
    c0 = res["contrib"].isel(batch=0).stack(lh=("layer", "head")).transpose("lh", "key_pos")
    mat = c0.values.astype(float)
    rows = [f"{int(L)}.{int(h)}" for L, h in zip(c0["layer"].values, c0["head"].values)]
    if "key_token_str" in res:
        cols = [f"{i}:{s!r}" for i, s in enumerate(res["key_token_str"].values.tolist())]
    else:
        cols = [str(i) for i in range(mat.shape[1])]
    dest = int(res["dest"].values[0])
    tstr = str(res["target_str"].values[0]) if "target_str" in res else str(int(res["target"].values[0]))
    title = f"Sequence 0: contribution to logit of {tstr!r} at position {dest}, per head and source position"
    vmax = float(np.nanmax(np.abs(mat))) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(cols) + 2), max(4, 0.25 * len(rows) + 2)))
    im = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xlabel("source position")
    ax.set_ylabel("layer.head")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    png = folder / "sources_seq0.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    pfig = go.Figure(go.Heatmap(z=mat, x=cols, y=rows, colorscale="RdBu", zmin=-vmax, zmax=vmax))
    pfig.update_layout(
        title=title,
        xaxis_title="source position",
        yaxis_title="layer.head",
        height=min(1600, max(450, 6 * len(rows) + 250)),
    )
    pfig.update_yaxes(autorange="reversed", type="category")  # "L.h" labels are names, not numbers
    pfig.update_xaxes(type="category")
    return [*paths, png, save_html(pfig, folder / "sources_seq0.html")]


SPEC = AnalyzerSpec(
    name="logit-attribution",
    func=logit_attribution,
    requires=REQUIRES,
    summary=summary,
    plot=plot,
    doc="Per-head, per-source decomposition of a target logit at a destination position (seed 002).",
)
