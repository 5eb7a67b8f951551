"""Path patching from sender heads to a receiver head's query, offline from two aligned stores.

The seed patches the senders' outputs from a corrupted run (e.g. ABC) into the *query input* of a
receiver head of the clean run (e.g. IOI), leaving everything else clean, and compares the
receiver's ``pattern[END, IO] - pattern[END, S1]`` patched vs clean. With the stores:

    resid' = resid_pre[L_r] + sum_senders (result_corrupt - result_clean)   (end position)
    q      = ln1(resid') @ W_Q[L_r, h_r] + b_Q[L_r, h_r]    (ln1 scale recomputed from resid')
    q      = rotary(q, end)                                 (rotary models)
    pattern[END, :] = softmax_causal(q . k_clean[L_r, kv(h_r)] / sqrt(d_head))

Only the end position's query is computed. Senders must sit in layers before the receiver's:
their direct path is the only one patched, so later-layer senders would not reach its query.
Swap the two stores for the other direction.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr

from headstore.analyze._ops import f32, kv_index, require
from headstore.analyze._plots import save_html
from headstore.analyze._registry import AnalyzerSpec
from headstore.analyze.ioi import check_aligned, column
from headstore.store_schema import HeadstoreError, provenance

NAME = "path-patch-query"
NEEDS = ("resid_pre", "k", "result", "W_Q", "b_Q")
POSITIONS = ("io_pos", "s1_pos", "end_pos")


def parse_heads(spec: str, what: str) -> list[tuple[int, int]]:
    """``"9.6, 9.9,10.10"`` -> ``[(9, 6), (9, 9), (10, 10)]``; ``""`` -> ``[]``."""
    heads: list[tuple[int, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        layer, dot, head = item.partition(".")
        if not dot or not layer.strip().isdigit() or not head.strip().isdigit():
            raise HeadstoreError(f"{what} {item!r} is not LAYER.HEAD (e.g. 9.6)")
        heads.append((int(layer), int(head)))
    if len(set(heads)) != len(heads):
        raise HeadstoreError(f"{what} {spec!r} names a head twice")
    return heads


def _check_head(ds: xr.Dataset, layer: int, head: int, what: str) -> None:
    layers = [int(x) for x in ds["layer"].values]
    if layer not in layers:
        raise HeadstoreError(
            f"{what} {layer}.{head}: layer {layer} is not in the store (it holds layers {layers}): "
            "extract with --layers including it"
        )
    n_heads = int(provenance(ds).config["n_heads"])
    if not 0 <= head < n_heads:
        raise HeadstoreError(f"{what} {layer}.{head}: the model has heads 0..{n_heads - 1}")


def ln1_normalize(resid: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Folded ln1 with the scale recomputed from ``resid``: LN centres then divides by sqrt(var + eps), RMS by sqrt(mean(x^2) + eps)."""
    cfg = provenance(ds).config
    x = f32(resid)
    if cfg["normalization_type"] == "LN":
        x = x - x.mean("d_model")
    scale = np.sqrt((x * x).mean("d_model") + np.float32(cfg["eps"]))
    return x / scale


def rotate(q: xr.DataArray, cos: xr.DataArray, sin: xr.DataArray) -> xr.DataArray:
    """HF rotary on the first ``d_rot`` dims: ``q*cos + rotate_half(q)*sin``, rotate_half(x) = cat(-x2, x1)."""
    d_rot = cos.sizes["d_rot"]
    half = d_rot // 2
    part = q.isel(d_head=slice(0, d_rot))
    rot_half = xr.concat([-part.isel(d_head=slice(half, d_rot)), part.isel(d_head=slice(0, half))], dim="d_head")
    cos, sin = f32(cos).rename(d_rot="d_head"), f32(sin).rename(d_rot="d_head")
    out = part * cos + rot_half * sin
    if d_rot < q.sizes["d_head"]:
        out = xr.concat([out, q.isel(d_head=slice(d_rot, None))], dim="d_head")
    return out.transpose(*q.dims)


def end_query(resid: xr.DataArray, ds: xr.Dataset, layer: int, head: int, end: xr.DataArray) -> xr.DataArray:
    """(batch, d_head) the receiver's query at the end position from a residual stream (batch, d_model)."""
    norm = ln1_normalize(resid, ds)
    q = xr.dot(norm, f32(ds["W_Q"].sel(layer=layer).isel(head=head)), dim="d_model") + f32(
        ds["b_Q"].sel(layer=layer).isel(head=head)
    )
    if "rotary_cos" in ds:
        q = rotate(q, ds["rotary_cos"].isel(pos=end), ds["rotary_sin"].isel(pos=end))
    return q


def end_pattern(q: xr.DataArray, k: xr.DataArray, end: xr.DataArray) -> xr.DataArray:
    """(batch, key_pos) causal softmax of ``q . k / sqrt(d_head)`` for the end query."""
    scores = xr.dot(q, k, dim="d_head") / np.float32(math.sqrt(q.sizes["d_head"]))
    valid = xr.DataArray(np.arange(k.sizes["pos"]), dims="pos") <= end
    top = scores.where(valid).max("pos")
    w = np.exp(scores - top).where(valid, np.float32(0))
    return (w / w.sum("pos")).rename(pos="key_pos")


def io_minus_s1(pattern_end: xr.DataArray, io: xr.DataArray, s1: xr.DataArray) -> xr.DataArray:
    return pattern_end.isel(key_pos=io) - pattern_end.isel(key_pos=s1)


def path_patch_query(
    clean_ds: xr.Dataset, corrupt_ds: xr.Dataset, senders: str | None = None, receiver: str | None = None
) -> xr.Dataset:
    """Receiver's ``pattern[END, IO] - pattern[END, S1]`` with the senders' outputs patched from ``corrupt_ds`` into its query.

    ``senders``: ``"L.H,L.H,..."`` (``""`` for none); ``receiver``: ``"L.H"``.
    """
    if receiver is None or senders is None:
        raise HeadstoreError(f"{NAME} needs --param senders=L.H,... (empty for none) and --param receiver=L.H")
    rec = parse_heads(receiver, "receiver")
    if len(rec) != 1:
        raise HeadstoreError(f"receiver {receiver!r} must be exactly one head LAYER.HEAD")
    (l_r, h_r), snd = rec[0], parse_heads(senders, "sender")
    require(clean_ds, NEEDS, NAME)
    require(corrupt_ds, ("result",), NAME)
    for ds in (clean_ds, corrupt_ds):
        missing = [c for c in POSITIONS if c not in ds]
        if missing:
            raise HeadstoreError(
                f"{NAME} needs the IOI columns {', '.join(missing)}: extract with --data ioi / ioi-abc"
            )
    check_aligned(clean_ds, corrupt_ds, NAME, POSITIONS)
    if provenance(clean_ds).config["positional_embedding_type"] == "rotary" and "rotary_cos" not in clean_ds:
        raise HeadstoreError(f"{NAME}: this rotary model's store lacks rotary_cos/rotary_sin: re-extract it")
    _check_head(clean_ds, l_r, h_r, "receiver")
    for L, h in snd:
        _check_head(clean_ds, L, h, "sender")
        if L >= l_r:
            raise HeadstoreError(
                f"sender {L}.{h} is not before the receiver's layer {l_r}: only earlier layers' heads reach its query"
            )

    end, io, s1 = column(clean_ds, "end_pos"), column(clean_ds, "io_pos"), column(clean_ds, "s1_pos")
    resid = f32(clean_ds["resid_pre"].sel(layer=l_r).isel(pos=end))  # (batch, d_model)
    patched_resid = resid
    for L, h in snd:
        c = f32(corrupt_ds["result"].sel(layer=L).isel(head=h, pos=end))
        o = f32(clean_ds["result"].sel(layer=L).isel(head=h, pos=end))
        patched_resid = patched_resid + (c - o)
    kv = int(kv_index(clean_ds).values[h_r])
    k = f32(clean_ds["k"].sel(layer=l_r).isel(kv_head=kv))  # (batch, pos, d_head), post-rotary
    pat_clean = end_pattern(end_query(resid, clean_ds, l_r, h_r, end), k, end)
    pat_patched = end_pattern(end_query(patched_resid, clean_ds, l_r, h_r, end), k, end)
    out = xr.Dataset(
        {
            "patched": io_minus_s1(pat_patched, io, s1),
            "clean": io_minus_s1(pat_clean, io, s1),
            "pattern_end_patched": pat_patched,
            "pattern_end_clean": pat_clean,
        }
    )
    out["change"] = out["patched"] - out["clean"]
    if "pattern" in clean_ds:
        stored = clean_ds["pattern"].sel(layer=l_r).isel(head=h_r, query_pos=end)
        out["clean_stored"] = io_minus_s1(f32(stored), io, s1)
    out = out.drop_vars([c for c in ("layer", "head") if c in out.coords])
    out.attrs = {
        "senders": ",".join(f"{L}.{h}" for L, h in snd),
        "receiver": f"{l_r}.{h_r}",
        "receiver_layer": l_r,
        "receiver_head": h_r,
        "receiver_kv_head": kv,
        "clean_dataset": str(provenance(clean_ds).dataset.get("kind", "")),
        "corrupt_dataset": str(provenance(corrupt_ds).dataset.get("kind", "")),
    }
    return out


def summary(result: xr.Dataset) -> pd.DataFrame:
    """One row for the receiver head: mean clean vs patched END->IO minus END->S1 attention."""
    change = np.asarray(result["change"].values, dtype=float)
    return pd.DataFrame(
        [
            {
                "layer": int(result.attrs["receiver_layer"]),
                "head": int(result.attrs["receiver_head"]),
                "senders": str(result.attrs["senders"]) or "(none)",
                "clean_mean": float(result["clean"].mean()),
                "patched_mean": float(result["patched"].mean()),
                "change_mean": float(change.mean()),
                "change_std": float(change.std()),
                "frac_decreased": float((change < 0).mean()),
                "n_prompts": int(change.size),
            }
        ]
    )


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    """The seed's figure: overlaid histograms of the attention difference, patched vs clean."""
    patched = np.asarray(result["patched"].values, dtype=float)
    clean = np.asarray(result["clean"].values, dtype=float)
    a = result.attrs
    senders = str(a.get("senders", "")) or "no heads"
    title = f"Difference in attn from END→IO vs. END→S1 of {a.get('receiver', '')} (path-patched vs clean)"
    names = [
        f"Patched ({senders} from {a.get('corrupt_dataset', 'corrupt')})",
        f"Clean ({a.get('clean_dataset', 'clean')})",
    ]
    xlabel = "Attn diff (positive ⇒ more attn paid to IO than S1)"
    lo = float(min(patched.min(), clean.min(), 0.0))
    hi = float(max(patched.max(), clean.max(), 0.0))
    bins = [float(x) for x in np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)]
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.hist(patched, bins=bins, alpha=0.7, label=names[0])
    ax.hist(clean, bins=bins, alpha=0.7, label=names[1])
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(title, fontsize=9)
    ax.legend()
    png = folder / "path_patch_query.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    pfig = go.Figure()
    for values, name in zip((patched, clean), names, strict=True):
        pfig.add_trace(
            go.Histogram(x=values, name=name, opacity=0.7, xbins={"start": lo, "end": hi, "size": (bins[1] - bins[0])})
        )
    pfig.add_vline(x=0.0, line={"color": "black", "width": 3, "dash": "dash"})
    pfig.update_layout(
        barmode="overlay", title=title, xaxis_title=xlabel, yaxis_title="prompts", width=800, height=600,
        template="simple_white",
    )  # fmt: skip
    return [png, save_html(pfig, folder / "path_patch_query.html")]


SPEC = AnalyzerSpec(
    name=NAME,
    func=path_patch_query,
    requires=(*NEEDS, *POSITIONS),
    summary=summary,
    plot=plot,
    n_stores=2,
    doc="path-patch senders' outputs (2nd store) into a receiver head's query (1st store): END->IO minus END->S1",
)
