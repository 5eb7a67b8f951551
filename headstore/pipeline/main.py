"""The main job, stage after stage: extract -> census -> experiments -> reports."""

from __future__ import annotations

from pathlib import Path

from headstore.pipeline.census_stage import run_census
from headstore.pipeline.experiments import Experiments
from headstore.pipeline.extract_stage import extract_stores
from headstore.pipeline.job import MainJob, Stages, console


def run_main_job(job: MainJob) -> list[Path]:
    """Extract, census, analyze, report. Rerunning resumes: finished stores and analyzer outputs are reused."""
    stage = Stages()
    stores = extract_stores(job, stage)
    outputs = run_census(job, stage, stores)
    # Each group of stores gets a folder of analyzer outputs, then a report built from them.
    experiments = Experiments(job, stage, stores["ioi"])
    for group, paths in {"ioi": [stores["ioi"]], "ioi-vs-abc": [stores["ioi"], stores["ioi-abc"]]}.items():
        outputs.extend(experiments.group(group, paths))
    console.print(stage.table())
    return outputs
