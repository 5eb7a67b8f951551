"""The main job on the embedded default: SmolLM2 over IOI (+ its ABC twin) and text, every
applicable analyzer, and the HTML reports, all under one output folder.

Rerunning resumes: finished stores are reused (extraction skips the batches already written),
and so are finished analyzer outputs (``OUT/GROUP/NAME/``, written under a temporary name and
renamed into place by ``run_analyzer``, so one that exists is complete). The reports read the
analyzer outputs back instead of computing them again. An analyzer that reads weights only
(circuits) runs once per model: the other stores of the same weights get a copy of its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from rich.console import Console
from rich.table import Table

from headstore.cli.registry import AnalyzerSpec
from headstore.store_schema import HeadstoreError, open_store
from headstore.store_schema.layout import FIELDS, WEIGHTS

console = Console()

# On IOI prompts the token after END is padding: attribute the answer (the IO name) instead.
STORE_PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("ioi", "logit-attribution"): ("target=io_token",),
    ("ioi-abc", "logit-attribution"): ("target=io_token",),
}


@dataclass(frozen=True)
class MainJob:
    out: Path
    model: str = "smollm2-135m"
    n_ioi: int = 16
    n_text: int = 8
    text_seq_len: int = 64
    batch_size: int = 8
    device: str = "auto"


class Stages:
    """Prints each stage as it starts and ends, with its wall time; ``table()`` sums them up."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, str]] = []
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        console.print(f"[bold cyan]>[/bold cyan] {name}", highlight=False)
        t0 = time.perf_counter()
        status = "failed"
        try:
            yield
            status = "done"
        except HeadstoreError:  # the analyzer refuses this input (e.g. needs parameters): not a crash
            status = "skipped"
            raise
        finally:
            dt = time.perf_counter() - t0
            self.times.append((name, dt, status))
            colour = {"done": "green", "skipped": "yellow"}.get(status, "red")
            console.print(f"[{colour}]{status}[/{colour}] {name} in {dt:.1f} s", highlight=False)

    def skip(self, name: str, why: str) -> None:
        console.print(f"[dim]= {name}: {why}[/dim]", highlight=False)
        self.times.append((name, 0.0, why))

    def table(self) -> Table:
        t = Table("stage", "seconds", "status", title=f"main job: {time.perf_counter() - self.t0:.1f} s in all")
        for name, dt, status in self.times:
            t.add_row(name, f"{dt:.1f}", status)
        return t


def _extract(job: MainJob, stage: Stages, data: str, fields: str, **kw: object) -> Path:
    from headstore.extract import ExtractRequest, extract

    path = job.out / "stores" / f"{data}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(f"extract {data}"):
        res = extract(
            ExtractRequest(
                model=job.model, data=data, out=str(path), fields=fields, batch_size=job.batch_size,
                device=job.device, **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        console.print(f"  {path}: {res.n_sequences} sequences ({res.skipped} batches already done)", highlight=False)
    return path


def _weights_key(spec: AnalyzerSpec, datasets: list[xr.Dataset], params: tuple[str, ...]) -> tuple[str, ...] | None:
    """For an analyzer that reads weights only (circuits), what its result depends on; else None."""
    if len(datasets) != 1 or any(r in FIELDS for r in spec.requires):
        return None
    ds = datasets[0]
    # Every stored weight (it may read optional ones, like W_EE), but the positional tables cut to
    # the store's seq_len unless it asks for them: stores of one model then share the key.
    positional = {w for w in WEIGHTS if "pos" in WEIGHTS[w].dims} - set(spec.requires)
    h = hashlib.sha256()
    for name in sorted(n for n in [*WEIGHTS, "vocab"] if n in ds and n not in positional):
        h.update(name.encode())
        h.update(np.ascontiguousarray(ds[name].values).tobytes())
    return (spec.name, h.hexdigest(), repr(ds["layer"].values.tolist()), repr(sorted(params)))


def _copy_output(src: Path, dst: Path) -> None:
    """Copy a finished analyzer folder, complete or not at all (copied aside, then renamed)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)


def run_main_job(job: MainJob) -> list[Path]:
    """Extract, analyze, report. Rerunning resumes: finished stores and analyzer outputs are reused."""
    from headstore.cli.registry import analyzers
    from headstore.cli.report import plan, write_report
    from headstore.cli.run import run_analyzer, safe_child, saved_output

    stage = Stages()
    ioi = _extract(job, stage, "ioi", "default,k,resid_pre", n_seq=job.n_ioi)
    abc = _extract(job, stage, "ioi-abc", "default,k,resid_pre", n_seq=job.n_ioi)
    text = _extract(job, stage, "text", "default", n_seq=job.n_text, seq_len=job.text_seq_len)
    # Each group of stores gets a folder of analyzer outputs, then a report built from them.
    groups = {"ioi": [ioi], "ioi-abc": [abc], "ioi-vs-abc": [ioi, abc], "text": [text]}
    outputs: list[Path] = []
    by_weights: dict[tuple[str, ...], Path] = {}  # weights-only analyzer + weights -> its output folder
    for group, paths in groups.items():
        stores = [str(p) for p in paths]
        datasets = [open_store(s) for s in stores]
        to_run, _not_applicable = plan(analyzers(), datasets)
        for spec in to_run:
            name = f"{spec.name} on {group}"
            params = STORE_PARAMS.get((group, spec.name), ())
            folder = safe_child(job.out / group, spec.name)
            key = _weights_key(spec, datasets, params)
            saved, why = saved_output(spec, job.out / group), "reused"
            if saved is None and key in by_weights:
                _copy_output(by_weights[key], folder)
                saved, why = saved_output(spec, job.out / group), f"same weights as {by_weights[key].parent.name}: copied"
            if saved is not None:
                stage.skip(name, why)
                outputs.extend(saved[1])
            else:
                try:
                    with stage(name):
                        _summary, written = run_analyzer(spec, stores, job.out / group, param_strings=params)
                except HeadstoreError as e:
                    console.print(f"  {e}", highlight=False)
                    continue
                outputs.extend(written)
            if key is not None:
                by_weights.setdefault(key, folder)
        report = job.out / f"report-{group}.html"
        with stage(f"report {group}"):
            write_report(stores, report, results=job.out / group, progress=False)
        console.print(f"  [green]report[/green] {report}", highlight=False)
        outputs.append(report)
    console.print(stage.table())
    return outputs
