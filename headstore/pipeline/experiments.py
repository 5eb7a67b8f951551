"""Stage 3 of the main job: every applicable declared analyzer on each group of stores (``OUT/GROUP/NAME/``),
reusing finished outputs and, for weights-only analyzers, the output of another store of the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

from headstore.analyze import registry
from headstore.analyze.registry import AnalyzerSpec
from headstore.pipeline.job import MainJob, Stages, console
from headstore.pipeline.runner import copy_output, weights_key
from headstore.report.analyzer_section import plan
from headstore.report.run import run_analyzer, safe_child, saved_output
from headstore.store_schema import HeadstoreError, open_store

# Calibration runs in the census on text (4k predictions, chosen heads); per head on every IOI
# prompt's heads it would cost minutes for a curve of a few hundred predictions.
IN_CENSUS_ONLY = {("ioi", "calibration")}
# On IOI prompts the token after END is padding: attribute the answer (the IO name) instead.
# Computed by the census on the same stores (OUT/census/GROUP/NAME/): copied, not recomputed.
FROM_CENSUS = {("ioi-vs-abc", "attribution-patching"), ("ioi-vs-abc", "edge-attribution")}
STORE_PARAMS: dict[tuple[str, str], Callable[[xr.Dataset], dict[str, Any]]] = {
    ("ioi", "logit-attribution"): lambda ds: {"target": ds["io_token"].load()},
    ("ioi-abc", "logit-attribution"): lambda ds: {"target": ds["io_token"].load()},
}


class Experiments:
    """One group's analyzers; ``by_weights`` (weights-only analyzer + weights -> its output folder) spans groups."""

    def __init__(self, job: MainJob, stage: Stages, ioi: Path) -> None:
        self.job, self.stage = job, stage
        comp = registry.analyzers()["composition"]  # the census computed it already: copy, don't recompute
        key = weights_key(comp, [open_store(ioi)], ()) or ("",)
        self.by_weights: dict[tuple[str, ...], Path] = {key: safe_child(job.out / "census" / "weights", comp.name)}

    def one(self, group: str, spec: AnalyzerSpec, stores: list[str], datasets: list[xr.Dataset]) -> list[Path]:
        """Run (or reuse, or copy) one analyzer's output for a group; its files, or none when it refuses."""
        name, out = f"{spec.name} on {group}", self.job.out / group
        make_params = STORE_PARAMS.get((group, spec.name))
        params = make_params(datasets[0]) if make_params else {}
        folder = safe_child(out, spec.name)
        key = weights_key(spec, datasets, tuple(params))
        saved, why = saved_output(spec, out), "reused"
        census = self.job.out / "census" / group
        if saved is None and (group, spec.name) in FROM_CENSUS and saved_output(spec, census) is not None:
            copy_output(safe_child(census, spec.name), folder)
            saved, why = saved_output(spec, out), "computed by the census: copied"
        if saved is None and key in self.by_weights:
            copy_output(self.by_weights[key], folder)
            saved, why = saved_output(spec, out), f"same weights as {self.by_weights[key].parent.name}: copied"
        written: list[Path] = []
        if saved is not None:
            self.stage.skip(name, why)
            written = saved[1]
        else:
            try:
                with self.stage(name):
                    _summary, written = run_analyzer(spec, stores, out, params)
            except HeadstoreError as e:
                console.print(f"  {e}", highlight=False)
                return []
        if key is not None:
            self.by_weights.setdefault(key, folder)
        return written

    def group(self, group: str, paths: list[Path]) -> list[Path]:
        """Every applicable analyzer on the group's stores, then the group's report page."""
        from headstore.report.page import write_report

        stores = [str(p) for p in paths]
        datasets = [open_store(s) for s in stores]
        to_run, _not_applicable = plan(registry.analyzers(), datasets)
        outputs: list[Path] = []
        for spec in (s for s in to_run if (group, s.name) not in IN_CENSUS_ONLY):
            outputs.extend(self.one(group, spec, stores, datasets))
        report = self.job.out / f"report-{group}.html"
        with self.stage(f"report {group}"):
            exclude = {n: "in the census (census.html), on text" for g, n in IN_CENSUS_ONLY if g == group}
            write_report(stores, report, results=self.job.out / group, progress=False, exclude=exclude)
        console.print(f"  [green]report[/green] {report}", highlight=False)
        return [*outputs, report]
