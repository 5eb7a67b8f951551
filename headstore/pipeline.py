"""The main job on the embedded default: SmolLM2 over IOI (+ its ABC twin) and text, every
applicable analyzer, and the HTML report, all under one output folder."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from headstore.store_schema import HeadstoreError, open_store

console = Console()

# On IOI prompts the token after END is padding: attribute the answer (the IO name) instead.
STORE_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("ioi", "logit-attribution"): {"target": "io_token"},
    ("ioi-abc", "logit-attribution"): {"target": "io_token"},
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


def _extract(job: MainJob, data: str, name: str, fields: str, **kw: object) -> Path:
    from headstore.extract import ExtractRequest, extract

    path = job.out / "stores" / f"{name}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = extract(
        ExtractRequest(
            model=job.model, data=data, out=str(path), fields=fields, batch_size=job.batch_size,
            device=job.device, **kw,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    console.print(f"[green]store[/green] {path}: {res.n_sequences} sequences ({res.skipped} batches already done)")
    return path


def run_main_job(job: MainJob) -> list[Path]:
    """Extract, analyze, report. Rerunning resumes: finished stores are reused."""
    from headstore.analyze._registry import analyzers
    from headstore.analyze._run import run_analyzer

    stores = {
        "ioi": _extract(job, "ioi", "ioi", "default,k,resid_pre", n_seq=job.n_ioi),
        "ioi-abc": _extract(job, "ioi-abc", "ioi-abc", "default,k,resid_pre", n_seq=job.n_ioi),
        "text": _extract(job, "text", "text", "default", n_seq=job.n_text, seq_len=job.text_seq_len),
    }
    outputs: list[Path] = []
    for store_name, path in stores.items():
        ds = open_store(path)
        for spec in analyzers().values():
            params = list(inspect.signature(spec.func).parameters.values())[spec.n_stores :]
            needs_args = [p.name for p in params if p.default is inspect.Parameter.empty]
            if spec.n_stores != 1 or needs_args or any(r not in ds for r in spec.requires):
                continue
            kwargs = STORE_PARAMS.get((store_name, spec.name), {})
            try:
                _summary, paths = run_analyzer(spec, [str(path)], job.out / store_name, kwargs)
            except HeadstoreError as e:
                console.print(f"[yellow]skip[/yellow] {spec.name} on {store_name}: {e}")
                continue
            console.print(f"[green]analyzed[/green] {spec.name} on {store_name}")
            outputs.extend(paths)
    pair = analyzers().get("ioi-pair")
    if pair is not None:
        _summary, paths = run_analyzer(pair, [str(stores["ioi"]), str(stores["ioi-abc"])], job.out / "ioi-vs-abc", {})
        console.print("[green]analyzed[/green] ioi-pair on ioi, ioi-abc")
        outputs.extend(paths)
    from headstore.report import write_report

    for store_name in ("ioi", "text"):
        report = job.out / f"report-{store_name}.html"
        write_report([str(stores[store_name])], report)
        console.print(f"[green]report[/green] {report}")
        outputs.append(report)
    return outputs
