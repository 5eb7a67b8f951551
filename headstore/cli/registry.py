"""The analyzers the CLI, the report and the main job know: name, function, what the store needs, how to
parse ``--param`` strings, the summary table and the figure. An explicit tuple: adding an analyzer adds a
line here (the public function itself lives in ``headstore.analyze``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr

from headstore import analyze as A
from headstore.cli import figures as F
from headstore.cli import parse as P
from headstore.cli.attention_attribution_figures import attention_attribution_plot, attention_attribution_summary

IOI_COLUMNS = ("io_pos", "s1_pos", "end_pos", "io_token", "s_token")


@dataclass(frozen=True)
class AnalyzerSpec:
    """``func(ds, **params) -> Dataset`` (two stores: ``func(ds_a, ds_b, **params)``).

    ``params``: option name -> parser of its ``--param`` string; ``summary`` turns the result into a
    per-head table (CSV, top rows printed); ``plot`` writes the seed's figure (PNG, HTML) under a folder.
    """

    name: str
    func: Callable[..., xr.Dataset]
    requires: tuple[str, ...]
    summary: Callable[[xr.Dataset], pd.DataFrame]
    plot: Callable[[xr.Dataset, Path], list[Path]]
    n_stores: int = 1
    doc: str = ""
    params: Mapping[str, P.Parser] = field(default_factory=dict)


SPECS = (
    AnalyzerSpec(
        "attention-attribution", A.attention_attribution, ("resid_pre", "z", "W_Q", "W_K", "b_Q", "b_K", "b_O"),
        attention_attribution_summary, attention_attribution_plot,
        doc="Why a head attends: its pre-softmax score at (query, key) split into query x key component terms",
        params={"head": P.head_param, "query_pos": P.position, "key_pos": P.position, "top_k": P.integer},
    ),
    AnalyzerSpec(
        "attention-stats", A.attention_stats, ("tokens", "pattern"),
        F.attention_stats_summary, F.attention_stats_plot,
        doc="Per head: mean attention entropy, attended distance and top-1 key mass, with their spread across sequences",
    ),
    AnalyzerSpec(
        "calibration", A.calibration, ("tokens", "resid_final", "ln_final_scale", "z", "W_O", "W_U", "b_U"),
        F.calibration_summary, F.calibration_plot,
        doc="Calibration curve and overconfidence; change when each head's direct effect is removed (seed 003).",
        params={"top_k": P.integer, "n_bins": P.integer, "heads": P.heads_param},
    ),
    AnalyzerSpec(
        "circuits", A.circuits, ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U", "b_U", "vocab"),
        F.circuits_summary, F.circuits_plot,
        doc="OV/QK circuit ranks of token pairs per head, from the weights only (seed: if/else circuits)",
        params={
            "out_token": P.token, "src_token": P.token, "query_token": P.token, "key_token": P.token,
            "embedding": P.one_of("W_E", "W_EE"), "top_k": P.integer,
        },
    ),
    AnalyzerSpec(
        "composition", A.composition, ("W_Q", "W_K", "W_V", "W_O"),
        F.composition_summary, F.composition_plot,
        doc="Q/K/V composition scores of every earlier head into every later one, from the weights, with a random baseline",
        params={"kinds": P.some_of("Q", "K", "V"), "n_draws": P.integer, "seed": P.integer},
    ),
    AnalyzerSpec(
        "copy-suppression", A.copy_suppression, ("tokens", "v", "pattern", "ln_final_scale", "W_O", "W_U"),
        F.copy_suppression_summary, F.copy_suppression_plot,
        doc="How much each head suppresses the logit of the token it attends to (seed 000, Part 1).",
        params={"only_negative": P.boolean},
    ),
    AnalyzerSpec(
        "head-scores", A.head_scores, ("tokens", "pattern"),
        F.head_scores_summary, F.head_scores_plot,
        doc="TransformerLens detect_head scores per head and sequence: previous-token, duplicate, induction, BOS, self",
        params={
            "kinds": P.some_of("previous_token", "duplicate_token", "induction", "bos", "self"),
            "exclude_bos": P.boolean, "exclude_current_token": P.boolean, "error_measure": P.one_of("mul", "abs"),
        },
    ),
    AnalyzerSpec(
        "ifelse-detector", A.ifelse_detector,
        ("pattern", "v", "ln_final_scale", "resid_final", "tokens", "W_O", "W_U", "split", "subset"),
        F.ifelse_summary, F.ifelse_plot,
        doc="Mahalanobis detectors on per-head logit attribution to ' else' (seed: if/else anomaly detection)",
        params={"effect_token": P.token, "max_tokens": P.integer},
    ),
    AnalyzerSpec(
        "ioi", A.ioi, ("pattern", "resid_final", "ln_final_scale", "W_U", "b_U", *IOI_COLUMNS),
        F.ioi_summary, F.ioi_plot,
        doc="IOI logit diff IO-S at END, and each head's attention END->IO minus END->S1",
        params={"io": P.position, "s1": P.position, "end": P.position, "io_token": P.token_ids, "s_token": P.token_ids},
    ),
    AnalyzerSpec(
        "ioi-pair", A.ioi_pair, ("pattern", "resid_final", "ln_final_scale", "W_U", "b_U", *IOI_COLUMNS),
        F.ioi_pair_summary, F.ioi_pair_plot, n_stores=2,
        doc="ioi on an IOI store and its aligned ABC twin (both scored with the IOI names)",
        params={"io": P.position, "s1": P.position, "end": P.position, "io_token": P.token_ids, "s_token": P.token_ids},
    ),
    AnalyzerSpec(
        "logit-attribution", A.logit_attribution,
        ("tokens", "pattern", "v", "result", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U", "b_V"),
        F.logit_attribution_summary, F.logit_attribution_plot,
        doc="Per-head, per-source decomposition of a target logit at a destination position (seed 002).",
        params={"target": P.token_ids, "dest": P.position},
    ),
    AnalyzerSpec(
        "path-patch-query", A.path_patch_query,
        ("resid_pre", "k", "result", "W_Q", "b_Q", "io_pos", "s1_pos", "end_pos"),
        F.path_patch_summary, F.path_patch_plot, n_stores=2,
        doc="path-patch senders' outputs (2nd store) into a receiver head's query (1st store): END->IO minus END->S1",
        params={"senders": P.heads_param, "receiver": P.head_param, "io": P.position, "s1": P.position, "end": P.position},
    ),
    AnalyzerSpec(
        "projection-loss", A.projection_loss,
        ("tokens", "v", "pattern", "z", "ln_final_scale", "resid_final", "W_O", "W_U", "b_U"),
        F.projection_loss_summary, F.projection_loss_plot,
        doc="Change in loss when each head keeps only its projection onto the source tokens' unembeddings (seed 000).",
        params={"only_negative": P.boolean},
    ),
)  # fmt: skip


def analyzers() -> dict[str, AnalyzerSpec]:
    """Name -> spec, sorted by name."""
    return {s.name: s for s in sorted(SPECS, key=lambda s: s.name)}
