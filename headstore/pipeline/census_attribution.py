"""The census's attribution section: every head ranked by attribution patching (AtP; IOI clean, ABC corrupt), AtP
checked against exact activation patching on the live model, and the top EAP edges of the IOI circuit beside the
census's name movers.

Exact activation patching of head (L, h), over the clean store's sequences b (the quantity AtP approximates to
first order)::

    exact[L, h] = mean_b  M(clean_b with z[L, :, h] from corrupt_b) - M(clean_b)

``z`` is ``blocks.L.attn.hook_z``, patched at every position, head h only; M the clean store's metric (``extract
--grad``), here ``logit[IO] - logit[S]`` at END. It runs on the top ``N_EXACT`` heads by ``|AtP|`` (each one
forward pass per batch), and the census reports Spearman's rho between the two scores over those heads: the
AtP paper's check (Kramar et al. 2024, Fig. 1). Outputs, under ``OUT/census/attribution/``: ``atp_vs_exact.csv``
(one row per head) and ``atp_vs_exact.png`` (the scatter), reused on a rerun (the CSV is written last, renamed
into place), and ``eap_circuit.png`` (the circuit graph with the name movers marked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from headstore.pipeline.census import Head, heads_of
from headstore.pipeline.job import MainJob, Stages, heads_text
from headstore.pipeline.runner import Runner
from headstore.report.attribution_figures import (
    atp_vs_exact_plot,
    attribution_patching_summary,
    edge_attribution_plot,
    edge_attribution_summary,
)
from headstore.report.census_report import Section

N_EXACT = 30  # heads patched exactly on the live model, the top by |AtP|
N_EDGES = 20  # EAP edges of the circuit graph


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank); NaN under 2 points or
    for a constant score."""
    ra = pd.Series(np.asarray(a, float)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, float)).rank().to_numpy()
    if ra.size < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _columns(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """The store's per-sequence columns (``io_token``, ``end_pos``, ``length``, ...), as the metric resolves them."""
    return {str(n): ds[n].values for n in ds.data_vars if ds[n].dims == ("batch",)}


def exact_patching(
    model: Any, clean: xr.Dataset, corrupt: xr.Dataset, heads: Sequence[Head], metric: str, batch_size: int = 8
) -> tuple[np.ndarray, float]:
    """``(exact, m_clean)``: ``exact[i]`` = mean over sequences of M with head ``heads[i]``'s ``hook_z`` (every
    position) taken from the corrupt run, minus M clean; ``m_clean`` = mean M clean. ``model`` is a
    ``headstore.extract.models.LoadedModel``; the tokens are the stores' own."""
    import torch

    from headstore.extract.families import attn_result
    from headstore.extract.grad import metric_values, parse_metric, resolve_metric

    bridge = model.bridge
    toks, toks_c = clean["tokens"].values, corrupt["tokens"].values
    targets = resolve_metric(parse_metric(metric), toks, _columns(clean), int(bridge.cfg.d_vocab))
    layers = sorted({L for L, _ in heads})
    sums, m_clean = np.zeros(len(heads)), 0.0
    with torch.inference_mode(), attn_result(bridge, False):
        for start in range(0, toks.shape[0], batch_size):
            x = torch.as_tensor(toks[start : start + batch_size], dtype=torch.long, device=bridge.cfg.device)
            xc = torch.as_tensor(toks_c[start : start + batch_size], dtype=torch.long, device=bridge.cfg.device)
            t = targets.rows(start, start + batch_size)
            _, cache = bridge.run_with_cache(xc, names_filter=[f"blocks.{L}.attn.hook_z" for L in layers])
            base = metric_values(bridge(x, return_type="logits"), x, t)
            m_clean += float(base.sum())
            for i, (L, h) in enumerate(heads):
                z_c = cache[f"blocks.{L}.attn.hook_z"]

                def patch(z: torch.Tensor, hook: Any, z_c: torch.Tensor = z_c, h: int = h) -> torch.Tensor:
                    z = z.clone()
                    z[:, :, h] = z_c[:, :, h]
                    return z

                logits = bridge.run_with_hooks(x, fwd_hooks=[(f"blocks.{L}.attn.hook_z", patch)], return_type="logits")
                sums[i] += float((metric_values(logits, x, t) - base).sum())
    n = toks.shape[0]
    return sums / n, m_clean / n


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def atp_vs_exact(job: MainJob, stage: Stages, stores: dict[str, Path], atp: xr.Dataset, folder: Path) -> pd.DataFrame:
    """The top ``N_EXACT`` heads by |AtP| with their exact patching effect (``folder/atp_vs_exact.csv`` and its
    scatter, reused when there)."""
    from headstore.store_schema import open_store

    csv, png = folder / "atp_vs_exact.csv", folder / "atp_vs_exact.png"
    if csv.is_file() and png.is_file():
        stage.skip("AtP vs exact patching", "reused")
        return pd.read_csv(csv)
    top = attribution_patching_summary(atp).head(N_EXACT)
    heads = [(int(L), int(h)) for L, h in zip(top["layer"], top["head"], strict=True)]
    with stage(f"AtP vs exact patching ({len(heads)} heads, live model)"):
        from headstore.extract.models import load_model

        model = load_model(job.model, job.device)
        clean, corrupt = open_store(stores["ioi"]), open_store(stores["ioi-abc"])
        exact, m_clean = exact_patching(model, clean, corrupt, heads, str(atp.attrs["metric"]), job.batch_size)
        table = pd.DataFrame({
            "head": [f"{L}.{h}" for L, h in heads], "layer": top["layer"], "head_index": top["head"],
            "atp": top["score"], "exact": exact, "atp_rank": np.arange(1, len(heads) + 1),
            "clean_metric": m_clean,
        })  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        atp_vs_exact_plot(table, spearman(table["atp"], table["exact"]), str(atp.attrs["metric"]), png)
        _write_csv(table, csv)  # last: its presence means the stage is complete
    return table


def attribution_section(
    job: MainJob, stage: Stages, run: Runner, stores: dict[str, Path], movers: pd.DataFrame
) -> tuple[Section, list[dict[str, Any]]]:
    """AtP of every head, AtP vs exact patching, and the top EAP edges beside the name movers: the census page's
    section and its findings rows."""
    pair = [stores["ioi"], stores["ioi-abc"]]
    atp, atp_figs = run("ioi-vs-abc", "attribution-patching", pair)
    eap, _eap_figs = run("ioi-vs-abc", "edge-attribution", pair)
    folder = job.out / "census" / "attribution"
    table = atp_vs_exact(job, stage, stores, atp, folder)
    rho = spearman(table["atp"], table["exact"])
    nm = [f"a{L}.h{h}" for L, h in heads_of(movers, len(movers))]
    graph = edge_attribution_plot(eap, folder, highlight=nm, name="eap_circuit", n=N_EDGES)
    edges = edge_attribution_summary(eap, N_EDGES)
    in_edges = set(edges["sender"]) | {r.split("<")[0] for r in edges["receiver"]}
    movers_table = movers.assign(in_top_edges=[n in in_edges for n in nm])
    ranked = attribution_patching_summary(atp)
    metric = str(atp.attrs.get("metric", "M"))
    text = (
        f"Attribution patching (AtP) of every head, M = {metric}, IOI prompts clean, their ABC twins corrupt: "
        f"(z_ABC - z_IOI) . dM/dz summed over positions, mean over prompts (stored gradients, no model). On the "
        f"live model, the top {len(table)} heads by |AtP| patched exactly (hook_z from the ABC run, one head at "
        f"a time; mean M clean {float(table['clean_metric'].iloc[0]):.3f}): Spearman rho = {rho:.3f} between AtP "
        f"and the exact change of M. The top {N_EDGES} EAP edges are drawn with the census's name movers "
        f"({heads_text(heads_of(movers, len(movers)))}) in gold."
    )
    tables = [("AtP vs exact patching (top heads by |AtP|)", table.drop(columns=["clean_metric"])),
              ("top heads by |AtP|", ranked.head(2 * job.top + 4)), (f"top {N_EDGES} EAP edges", edges),
              ("name movers (census) and whether they are in those edges", movers_table)]  # fmt: skip
    section = Section("Attribution patching", text, tables, [folder / "atp_vs_exact.png", *graph, *atp_figs])
    findings = [
        {"kind": "attribution patching", "rank": i + 1, "head": f"{r.layer}.{r.head}", "score": r.score,
         "definition": f"AtP, M = {metric}, IOI clean, ABC corrupt (largest |score|)"}
        for i, r in enumerate(ranked.head(job.top).itertuples(index=False))
    ]  # fmt: skip
    findings.append({"kind": "AtP vs exact patching", "rank": 0, "head": "-", "score": rho,
                     "definition": f"Spearman rho over the top {len(table)} heads by |AtP| (atp_vs_exact.csv)"})  # fmt: skip
    return section, findings
