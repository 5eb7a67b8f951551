"""IOI metrics: logit difference IO - S at the end token, and every head's END->IO vs END->S1 attention.

``ioi`` reads one store; ``ioi_pair`` reads an IOI store and its aligned ABC twin (same ``--seed`` and
``--n-seq``) and scores both with the IOI prompt's IO and S tokens, as the seed's
``generate_data_and_caches`` does. Positions (``io``, ``s1``, ``end``) and tokens (``io_token``,
``s_token``) default to the store's columns ``io_pos, s1_pos, end_pos, io_token, s_token`` (written by
``--data ioi`` and by a researcher's own JSONL/CSV with those columns); pass ints or one per sequence
to use any other store; ``io`` and ``s1`` must not come after ``end`` in any sequence (the end token's
attention cannot reach a later token: refused)::

    logit_diff[b]        = logits[b, end, io_token] - logits[b, end, s_token]     (from resid_final)
    attn_diff[L, h, b]   = pattern[b, L, h, end, io] - pattern[b, L, h, end, s1]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from headstore.analyze import _args
from headstore.analyze._maths import final_logits, require
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.analyze.types import Positions, TokenIds

NEEDS = ("pattern", "resid_final", "ln_final_scale", "W_U", "b_U")
COLUMNS = ("io_pos", "s1_pos", "end_pos", "io_token", "s_token")  # read when no value is passed
REQUIRES = (*NEEDS, *COLUMNS)


@dataclass(frozen=True)
class _Where:
    """Resolved (batch,) positions and token ids."""

    io: xr.DataArray
    s1: xr.DataArray
    end: xr.DataArray
    io_token: xr.DataArray
    s_token: xr.DataArray


def _where(
    ds: xr.Dataset,
    io: _args.Positions | None,
    s1: _args.Positions | None,
    end: _args.Positions | None,
    io_token: _args.TokenIds | None,
    s_token: _args.TokenIds | None,
) -> _Where:
    where = _Where(
        io=_args.positions(ds, io, "io", column="io_pos"),
        s1=_args.positions(ds, s1, "s1", column="s1_pos"),
        end=_args.positions(ds, end, "end", column="end_pos"),
        io_token=_args.token_ids(ds, io_token, "io_token", column="io_token"),
        s_token=_args.token_ids(ds, s_token, "s_token", column="s_token"),
    )
    _args.check_causal(ds, where.io, "io", where.end, "end")
    _args.check_causal(ds, where.s1, "s1", where.end, "end")
    return where


def end_logit_diff(ds: xr.Dataset, where: _Where) -> xr.DataArray:
    """(batch,) ``logit[end, IO] - logit[end, S]`` recomputed from resid_final at ``end`` only."""
    lg = final_logits(ds, ds["resid_final"].isel(pos=where.end), ds["ln_final_scale"].isel(pos=where.end))
    return lg.isel(d_vocab=where.io_token) - lg.isel(d_vocab=where.s_token)


def _metrics(ds: xr.Dataset, where: _Where) -> xr.Dataset:
    at_end = ds["pattern"].isel(query_pos=where.end)
    attn_io = at_end.isel(key_pos=where.io).astype(np.float32).transpose("layer", "head", "batch")
    attn_s1 = at_end.isel(key_pos=where.s1).astype(np.float32).transpose("layer", "head", "batch")
    diff = attn_io - attn_s1
    ld = end_logit_diff(ds, where)
    out = xr.Dataset(
        {
            "attn_diff_mean": diff.mean("batch"),
            "attn_io_mean": attn_io.mean("batch"),
            "attn_s1_mean": attn_s1.mean("batch"),
            "attn_diff": diff,
            "logit_diff": ld,
            "logit_diff_mean": ld.mean("batch"),
        }
    )
    return out.drop_vars([c for c in ("query_pos", "key_pos", "pos", "d_vocab") if c in out.coords])


def ioi(
    ds: xr.Dataset,
    *,
    io: _args.Positions | None = None,
    s1: _args.Positions | None = None,
    end: _args.Positions | None = None,
    io_token: _args.TokenIds | None = None,
    s_token: _args.TokenIds | None = None,
) -> xr.Dataset:
    """Per prompt: logit diff IO - S at ``end``, and ``pattern[end, io] - pattern[end, s1]`` per head."""
    require(ds, NEEDS, "ioi")
    out = _metrics(ds, _where(ds, io, s1, end, io_token, s_token))
    out.attrs = {"analyzer": "ioi", "dataset": ds.hs.provenance.dataset.kind}
    return out


def ioi_pair(
    ioi_ds: xr.Dataset,
    abc_ds: xr.Dataset,
    *,
    io: _args.Positions | None = None,
    s1: _args.Positions | None = None,
    end: _args.Positions | None = None,
    io_token: _args.TokenIds | None = None,
    s_token: _args.TokenIds | None = None,
) -> xr.Dataset:
    """``ioi`` on an IOI store and its ABC twin, both at the IOI store's positions and scored with its IO and S tokens."""
    for ds in (ioi_ds, abc_ds):
        require(ds, NEEDS, "ioi-pair")
    _args.check_aligned(ioi_ds, abc_ds, "ioi-pair", ("io_pos", "s1_pos", "end_pos"))
    where = _where(ioi_ds, io, s1, end, io_token, s_token)
    a, b = _metrics(ioi_ds, where), _metrics(abc_ds, where)
    out = xr.merge([a.rename({k: f"{k}_ioi" for k in a.data_vars}), b.rename({k: f"{k}_abc" for k in b.data_vars})])
    out.attrs = {
        "analyzer": "ioi-pair",
        "dataset_ioi": ioi_ds.hs.provenance.dataset.kind,
        "dataset_abc": abc_ds.hs.provenance.dataset.kind,
    }
    return out


PARAMS = {"io": Positions, "s1": Positions, "end": Positions, "io_token": TokenIds, "s_token": TokenIds}
SPEC = AnalyzerSpec(
    "ioi",
    ioi,
    REQUIRES,
    doc="IOI logit diff IO-S at END, and each head's attention END->IO minus END->S1",
    params=PARAMS,
)
PAIR_SPEC = AnalyzerSpec(
    "ioi-pair", ioi_pair, REQUIRES, n_stores=2,
    doc="ioi on an IOI store and its aligned ABC twin (both scored with the IOI names)", params=PARAMS,
)  # fmt: skip
register_analyzer(SPEC)
register_analyzer(PAIR_SPEC)
