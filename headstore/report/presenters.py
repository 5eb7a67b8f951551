"""How each declared analyzer is presented: its per-head summary table and its figure, keyed by the
analyzer's name (``headstore.analyze.registry``). Used by the CLI's ``analyze``, the report and the main job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr

from headstore.report import attribution_figures as AF
from headstore.report import figures as F
from headstore.report import figures_attention as AA
from headstore.report import figures_examples as X
from headstore.report import figures_heads as H
from headstore.store_schema import HeadstoreError


@dataclass(frozen=True)
class Presenter:
    """``summary(result) -> DataFrame`` (``summary.csv``); ``plot(result, folder) -> [paths]`` (PNG, HTML)."""

    summary: Callable[[xr.Dataset], pd.DataFrame]
    plot: Callable[[xr.Dataset, Path], list[Path]]


PRESENTERS: dict[str, Presenter] = {
    "attention-attribution": Presenter(AA.attention_attribution_summary, AA.attention_attribution_plot),
    "attention-search": Presenter(X.attention_search_summary, X.attention_search_plot),
    "attention-stats": Presenter(H.attention_stats_summary, H.attention_stats_plot),
    "attribution-patching": Presenter(AF.attribution_patching_summary, AF.attribution_patching_plot),
    "calibration": Presenter(F.calibration_summary, F.calibration_plot),
    "circuits": Presenter(H.circuits_summary, H.circuits_plot),
    "composition": Presenter(H.composition_summary, H.composition_plot),
    "copy-suppression": Presenter(F.copy_suppression_summary, F.copy_suppression_plot),
    "edge-attribution": Presenter(AF.edge_attribution_summary, AF.edge_attribution_plot),
    "head-scores": Presenter(H.head_scores_summary, H.head_scores_plot),
    "head-similarity": Presenter(X.head_similarity_summary, X.head_similarity_plot),
    "ifelse-detector": Presenter(H.ifelse_summary, H.ifelse_plot),
    "ioi": Presenter(F.ioi_summary, F.ioi_plot),
    "ioi-pair": Presenter(F.ioi_pair_summary, F.ioi_pair_plot),
    "logit-attribution": Presenter(F.logit_attribution_summary, F.logit_attribution_plot),
    "path-patch-query": Presenter(F.path_patch_summary, F.path_patch_plot),
    "projection-loss": Presenter(F.projection_loss_summary, F.projection_loss_plot),
    "top-attention": Presenter(X.top_attention_summary, X.top_attention_plot),
    "top-effects": Presenter(X.top_effects_summary, X.top_effects_plot),
}


def presenter(name: str) -> Presenter:
    if name not in PRESENTERS:
        raise HeadstoreError(f"analyzer {name!r} has no summary or figure: add one to headstore/report/presenters.py")
    return PRESENTERS[name]
