"""IOI metrics: logit difference IO - S at the end token, and every head's END->IO vs END->S1 attention.

``ioi`` reads one store (extracted with ``--data ioi`` or ``--data ioi-abc``); ``ioi_pair`` reads an
IOI store and its aligned ABC twin (same ``--seed`` and ``--n-seq``) and scores both with the IOI
prompt's IO and S tokens, as the seed's ``generate_data_and_caches`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from headstore.analyze._ops import logits, require
from headstore.analyze._plots import head_table, layer_head_heatmaps
from headstore.analyze._registry import AnalyzerSpec
from headstore.store_schema import HeadstoreError, provenance

IOI_COLUMNS = ("io_pos", "s1_pos", "end_pos", "io_token", "s_token")
NEEDS = ("pattern", "resid_final", "ln_final_scale", "W_U", "b_U")


def require_ioi_columns(ds: xr.Dataset, analyzer: str) -> None:
    """Refuse a store without the IOI per-sequence columns (they come from the dataset, not ``--fields``)."""
    missing = [c for c in IOI_COLUMNS if c not in ds]
    if missing:
        raise HeadstoreError(
            f"{analyzer} needs the IOI columns {', '.join(missing)}, which this store lacks: "
            "extract it with --data ioi (or ioi-abc)"
        )


def column(ds: xr.Dataset, name: str) -> xr.DataArray:
    """A (batch,) metadata column, loaded (tiny) as an int64 indexer."""
    return xr.DataArray(np.asarray(ds[name].values, dtype=np.int64), dims="batch")


def end_logit_diff(ds: xr.Dataset, io_token: xr.DataArray, s_token: xr.DataArray) -> xr.DataArray:
    """(batch,) ``logit[end, IO] - logit[end, S]`` recomputed from resid_final at ``end_pos`` only."""
    end = column(ds, "end_pos")
    at_end = xr.Dataset(
        {
            "resid_final": ds["resid_final"].isel(pos=end),
            "ln_final_scale": ds["ln_final_scale"].isel(pos=end),
            "W_U": ds["W_U"],
            "b_U": ds["b_U"],
        },
        attrs=ds.attrs,
    )
    lg = logits(at_end)  # (batch, d_vocab): the end position only
    return lg.isel(d_vocab=io_token) - lg.isel(d_vocab=s_token)


def end_attention(ds: xr.Dataset, key: str) -> xr.DataArray:
    """(batch, layer, head) ``pattern[end, key]`` for key column ``key`` (io_pos, s1_pos, ...)."""
    return ds["pattern"].isel(query_pos=column(ds, "end_pos"), key_pos=column(ds, key)).astype(np.float32)


def _metrics(ds: xr.Dataset, io_token: xr.DataArray, s_token: xr.DataArray) -> xr.Dataset:
    attn_io = end_attention(ds, "io_pos")
    attn_s1 = end_attention(ds, "s1_pos")
    diff = attn_io - attn_s1
    ld = end_logit_diff(ds, io_token, s_token)
    return xr.Dataset(
        {
            "logit_diff": ld,
            "logit_diff_mean": ld.mean("batch"),
            "attn_diff": diff,
            "attn_diff_mean": diff.mean("batch"),
            "attn_io_mean": attn_io.mean("batch"),
            "attn_s1_mean": attn_s1.mean("batch"),
        }
    )


def ioi(ds: xr.Dataset, abc: xr.Dataset | None = None) -> xr.Dataset:
    """Per prompt: logit diff IO - S at the end token, and ``pattern[end, IO] - pattern[end, S1]`` per head.

    With ``abc`` (the aligned ABC store) this is :func:`ioi_pair`.
    """
    if abc is not None:
        if not isinstance(abc, xr.Dataset):
            raise HeadstoreError("ioi takes one store: use the ioi-pair analyzer for an IOI store and its ABC twin")
        return ioi_pair(ds, abc)
    require(ds, NEEDS, "ioi")
    require_ioi_columns(ds, "ioi")
    out = _metrics(ds, column(ds, "io_token"), column(ds, "s_token"))
    out.attrs = {"dataset": str(provenance(ds).dataset.get("kind", ""))}
    return out


def check_aligned(
    a: xr.Dataset, b: xr.Dataset, analyzer: str, keys: tuple[str, ...] = ("io_pos", "s1_pos", "end_pos")
) -> None:
    """Refuse pairing stores of different models, or whose prompts do not line up position for position."""
    provenance(a).check_same_model(provenance(b))
    for dim in ("batch", "pos"):
        if a.sizes.get(dim) != b.sizes.get(dim):
            raise HeadstoreError(
                f"{analyzer}: the two stores differ in {dim} size ({a.sizes.get(dim)} vs {b.sizes.get(dim)}): "
                "extract both with the same --seed and --n-seq"
            )
    for key in keys:
        if not np.array_equal(np.asarray(a[key].values), np.asarray(b[key].values)):
            raise HeadstoreError(
                f"{analyzer}: the two stores' {key} differ, so their prompts are not aligned: "
                "extract both with the same --seed and --n-seq (--data ioi and ioi-abc)"
            )


def ioi_pair(ioi_ds: xr.Dataset, abc_ds: xr.Dataset) -> xr.Dataset:
    """``ioi`` on an IOI store and its ABC twin, both scored with the IOI prompt's IO and S tokens."""
    for ds in (ioi_ds, abc_ds):
        require(ds, NEEDS, "ioi-pair")
        require_ioi_columns(ds, "ioi-pair")
    check_aligned(ioi_ds, abc_ds, "ioi-pair")
    io_tok, s_tok = column(ioi_ds, "io_token"), column(ioi_ds, "s_token")
    a = _metrics(ioi_ds, io_tok, s_tok)
    b = _metrics(abc_ds, io_tok, s_tok)
    out = xr.merge([a.rename({k: f"{k}_ioi" for k in a.data_vars}), b.rename({k: f"{k}_abc" for k in b.data_vars})])
    out.attrs = {
        "dataset_ioi": str(provenance(ioi_ds).dataset.get("kind", "")),
        "dataset_abc": str(provenance(abc_ds).dataset.get("kind", "")),
    }
    return out


def summary(result: xr.Dataset) -> pd.DataFrame:
    """Heads sorted by mean attention END->IO (highest first)."""
    table = head_table(result["attn_io_mean"], "attn_end_io", ascending=False)
    diff = result["attn_diff_mean"].transpose("layer", "head")
    s1 = result["attn_s1_mean"].transpose("layer", "head")
    layers = list(diff["layer"].values)
    rows = [(layers.index(L), int(h)) for L, h in zip(table["layer"], table["head"], strict=True)]
    table["attn_end_s1"] = [float(s1.values[i, h]) for i, h in rows]
    table["attn_diff"] = [float(diff.values[i, h]) for i, h in rows]
    table["logit_diff_mean"] = float(result["logit_diff_mean"])
    return table


def summary_pair(result: xr.Dataset) -> pd.DataFrame:
    """Heads sorted by mean attention END->IO on the IOI store, with the ABC store beside it."""
    table = head_table(result["attn_io_mean_ioi"], "attn_end_io_ioi", ascending=False)
    layers = list(result["layer"].values)
    rows = [(layers.index(L), int(h)) for L, h in zip(table["layer"], table["head"], strict=True)]
    for name in ("attn_io_mean_abc", "attn_diff_mean_ioi", "attn_diff_mean_abc"):
        m = result[name].transpose("layer", "head").values
        table[name.replace("_mean", "").replace("attn_io", "attn_end_io")] = [float(m[i, h]) for i, h in rows]
    table["logit_diff_ioi"] = float(result["logit_diff_mean_ioi"])
    table["logit_diff_abc"] = float(result["logit_diff_mean_abc"])
    return table


def plot(result: xr.Dataset, folder: Path) -> list[Path]:
    return layer_head_heatmaps(
        [result["attn_diff_mean"]],
        ["mean pattern[END, IO] - pattern[END, S1]"],
        f"IOI attention END->IO minus END->S1 (mean logit diff {float(result['logit_diff_mean']):.3f})",
        folder / "ioi_attn_diff",
    )


def plot_pair(result: xr.Dataset, folder: Path) -> list[Path]:
    return layer_head_heatmaps(
        [result["attn_diff_mean_ioi"], result["attn_diff_mean_abc"]],
        [
            f"IOI (mean logit diff {float(result['logit_diff_mean_ioi']):.3f})",
            f"ABC (mean logit diff {float(result['logit_diff_mean_abc']):.3f})",
        ],
        "mean pattern[END, IO] - pattern[END, S1]",
        folder / "ioi_pair_attn_diff",
    )


SPEC = AnalyzerSpec(
    name="ioi",
    func=ioi,
    requires=(*NEEDS, *IOI_COLUMNS),
    summary=summary,
    plot=plot,
    doc="IOI logit diff IO-S at END, and each head's attention END->IO minus END->S1",
)

# The registry discovers one SPEC per module: a module holding ``from headstore.analyze.ioi import
# PAIR_SPEC as SPEC`` puts ``ioi-pair`` on the CLI.
PAIR_SPEC = AnalyzerSpec(
    name="ioi-pair",
    func=ioi_pair,
    requires=(*NEEDS, *IOI_COLUMNS),
    summary=summary_pair,
    plot=plot_pair,
    n_stores=2,
    doc="ioi on an IOI store and its aligned ABC twin (both scored with the IOI names)",
)
