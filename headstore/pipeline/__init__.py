"""The main job on the embedded default: a head census of SmolLM2-135M, then the seeds' experiments on
heads chosen from the data, and the HTML reports, all under one output folder.

Stores (``OUT/stores/``): IOI prompts and their ABC twins (with the gradients of ``logit[IO] - logit[S]`` at
END, ``extract --grad``), text windows (for calibration), and repeated random tokens (for induction). The census
(``OUT/census/``, page ``OUT/census.html``): head scores, attention statistics, composition, copy suppression,
name movers (``headstore.pipeline.census`` says how each kind is chosen), path patching from the top name movers
into the top copy-suppressive heads in both directions (seed 001), attribution patching of every head checked
against exact activation patching on the live model, with the top EAP edges beside the name movers
(``census_attribution``), and calibration with those heads' direct effects removed (seed 003). Then the
per-store reports of every applicable analyzer on the IOI store and the IOI/ABC pair, and the head dashboard
of the IOI store (``OUT/dashboard/index.html``, ``headstore dashboard``).

Rerunning resumes: finished stores are reused (extraction skips the batches already written),
and so are finished analyzer outputs (``OUT/GROUP/NAME/``, written under a temporary name and
renamed into place by ``headstore.report.run``, so one that exists is complete). The reports read the
analyzer outputs back instead of computing them again. An analyzer that reads weights only
(circuits) runs once per model: the other stores of the same weights get a copy of its output.

Stages, each a module: ``extract_stage`` (the stores, with the fields their analyzers declare) ->
``census_stage`` -> ``experiments`` (every applicable analyzer per group of stores) -> the reports
(``headstore.report``). ``job`` holds the settings and what is decided from the analyzers' declarations.
"""

from headstore.pipeline.job import MainJob, Stages
from headstore.pipeline.main import run_main_job

__all__ = ["MainJob", "Stages", "run_main_job"]
