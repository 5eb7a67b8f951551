"""Stage 1 of the main job: extract its stores (``OUT/stores/``), with the fields their analyzers declare."""

from __future__ import annotations

from pathlib import Path

from headstore.pipeline.job import STORES, MainJob, Stages, console, extract_fields
from headstore.pipeline.text_dataset import text_data


def weights_dir(job: MainJob) -> Path:
    """The weights store the job's stores share (W_E, W_EE, W_U, ... written once per model)."""
    return job.out / "stores" / f"weights-{Path(job.model).name}.zarr"


def extract_store(job: MainJob, stage: Stages, name: str, data: str | None = None, **kw: object) -> Path:
    """Store ``name`` of the main job, from its plan's data source unless ``data`` names another."""
    from headstore.extract import ExtractRequest, extract

    plan = STORES[name]
    path = job.out / "stores" / f"{plan.data}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(f"extract {plan.data}"):
        res = extract(
            ExtractRequest(
                model=job.model, data=data or plan.data, out=str(path), fields=extract_fields(plan),
                batch_size=job.batch_size, device=job.device, weights=str(weights_dir(job)),
                grad=plan.grad, **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        console.print(f"  {path}: {res.n_sequences} sequences ({res.skipped} batches already done)", highlight=False)
    return path


def extract_stores(job: MainJob, stage: Stages) -> dict[str, Path]:
    """Every store of the main job, by name (finished ones are reused: extraction resumes)."""
    return {
        "ioi": extract_store(job, stage, "ioi", n_seq=job.n_ioi),
        "ioi-abc": extract_store(job, stage, "ioi-abc", n_seq=job.n_ioi),
        "text": extract_store(
            job,
            stage,
            "text",
            text_data(job.out, job.text_data),
            n_seq=job.n_text,
            seq_len=job.text_seq_len,
            dtype="float16",
        ),
        "repeated-random": extract_store(
            job, stage, "repeated-random", n_seq=job.n_repeat, seq_len=job.repeat_seq_len, dtype="float16"
        ),
    }
