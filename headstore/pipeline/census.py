"""The head census of a model: which heads are of which kind, chosen from the data, not by hand.

Pure functions over the analyzers' results (``xarray.Dataset``s from ``headstore.analyze``), so a
researcher can call them in a notebook on their own results; the main job (``headstore.pipeline``)
calls them on SmolLM2's stores and renders the census page (``headstore.report.census_report``).

Definitions (per head, means over the dataset's sequences):

- previous-token, duplicate-token, induction, BOS-sink: ``head_scores`` (TransformerLens's ``detect_head``
  scores) on a ``repeated-random`` store, highest first;
- copy suppression: ``copy_suppression`` score on the IOI store, most negative first;
- name movers (IOI paper; seed 001's ``NAME_MOVERS``): heads that attend from END to the IO name more
  than to S1 (``attn_io_mean > attn_s1_mean``) and whose direct effect raises ``logit[IO] - logit[S]``:
  ``dla = per_head(target=io_token) - per_head(target=s_token)`` from ``logit_attribution`` at END,
  largest positive first;
- negative name movers (seed 001's ``NEG_NAME_MOVERS``): the same attention condition, most negative
  ``dla`` first.

A NaN score is "not measured", never a rank: ``ranked`` drops NaN heads, so they are in no kind's list. On a
store whose ``pattern`` was kept for some layers only (``extract --pattern-layers``), the other layers' heads
have NaN attention (``ioi``) and NaN ``per_head`` (``logit_attribution``), hence NaN ``attn_io``, ``attn_s1``
and ``dla_io_minus_s`` in :func:`name_mover_table`: they are never name movers nor negative name movers (nor
anything else), whatever their ``per_head_from_result``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

Head = tuple[int, int]


def ranked(score: xr.DataArray, *, largest: bool = True, where: xr.DataArray | None = None) -> pd.DataFrame:
    """(layer, head) scores -> rows ``layer, head, value`` sorted (``largest`` first, else smallest),
    keeping only heads where ``where`` holds (NaN scores dropped)."""
    s = score.transpose("layer", "head")
    keep = np.isfinite(s.values) if where is None else np.isfinite(s.values) & where.transpose("layer", "head").values
    li, hi = np.nonzero(keep)
    table = pd.DataFrame({"layer": s["layer"].values[li].astype(int), "head": hi, "value": s.values[li, hi]})
    return table.sort_values("value", ascending=not largest, kind="stable").reset_index(drop=True)


def heads_of(table: pd.DataFrame, k: int) -> list[Head]:
    return [(int(L), int(h)) for L, h in table[["layer", "head"]].head(k).itertuples(index=False)]


def name_mover_table(ioi: xr.Dataset, attribution_io: xr.Dataset, attribution_s: xr.Dataset) -> xr.Dataset:
    """Per head: mean END->IO and END->S1 attention and the direct effect on ``logit[IO] - logit[S]`` at END
    (NaN for heads whose pattern was not stored: see the module docstring)."""
    dla = (attribution_io["per_head"] - attribution_s["per_head"]).mean("batch")
    return xr.Dataset(
        {
            "attn_io": ioi["attn_io_mean"],
            "attn_s1": ioi["attn_s1_mean"],
            "dla_io_minus_s": dla.transpose("layer", "head"),
        }
    )


def name_movers(table: xr.Dataset, k: int = 3) -> pd.DataFrame:
    """Heads attending END->IO more than END->S1 whose direct effect favours IO, strongest first."""
    attends_io = table["attn_io"] > table["attn_s1"]
    rows = ranked(table["dla_io_minus_s"], largest=True, where=attends_io & (table["dla_io_minus_s"] > 0))
    return rows.head(k)


def negative_name_movers(table: xr.Dataset, k: int = 3) -> pd.DataFrame:
    """Heads attending END->IO more than END->S1 whose direct effect favours S (suppresses IO), strongest first."""
    attends_io = table["attn_io"] > table["attn_s1"]
    rows = ranked(table["dla_io_minus_s"], largest=False, where=attends_io & (table["dla_io_minus_s"] < 0))
    return rows.head(k)


@dataclass(frozen=True)
class PatchPlan:
    """Path patching from ``senders`` into ``receiver``'s query (seed 001)."""

    senders: list[Head]
    receiver: Head


def patch_plans(senders: Sequence[Head], receivers: Sequence[Head], k: int = 2) -> list[PatchPlan]:
    """For the first ``k`` receivers that some sender precedes: the senders in earlier layers than it."""
    plans = []
    for r in receivers:
        before = [s for s in senders if s[0] < r[0]]
        if before:
            plans.append(PatchPlan(before, r))
        if len(plans) == k:
            break
    return plans


def composition_block(comp: xr.Dataset, earlier: Sequence[Head], later: Sequence[Head], kind: str) -> pd.DataFrame:
    """``kind``-composition scores of each (earlier head A -> later head B) pair with A's layer < B's,
    beside the Gaussian baseline (``z = (score - baseline_mean) / baseline_std``)."""
    mean, std = float(comp["baseline_mean"].sel(kind=kind)), float(comp["baseline_std"].sel(kind=kind))
    rows = []
    for a in earlier:
        for b in later:
            if a[0] >= b[0]:
                continue
            v = float(comp[kind].sel(layer_a=a[0], head_a=a[1], layer_b=b[0], head_b=b[1]))
            rows.append({"A": f"{a[0]}.{a[1]}", "B": f"{b[0]}.{b[1]}", kind: v, "z": (v - mean) / std})
    return pd.DataFrame(rows, columns=["A", "B", kind, "z"])


def rank_of_score(comp: xr.Dataset, kind: str, a: Head, b: Head) -> int:
    """How many earlier heads compose into ``b`` more strongly than ``a`` does (0 = the strongest)."""
    col = comp[kind].sel(layer_b=b[0], head_b=b[1])
    v = float(col.sel(layer_a=a[0], head_a=a[1]))
    return int((col > v).sum())
