"""The main job on the embedded default: a head census of SmolLM2-135M, then the seeds' experiments on
heads chosen from the data, and the HTML reports, all under one output folder.

Stores (``OUT/stores/``): IOI prompts and their ABC twins, text windows (for calibration), and
repeated random tokens (for induction). The census (``OUT/census/``, page ``OUT/census.html``): head
scores, attention statistics, composition, copy suppression, name movers (``headstore.census`` says how
each kind is chosen), path patching from the top name movers into the top copy-suppressive heads in
both directions (seed 001) and calibration with those heads' direct effects removed (seed 003). Then the
per-store reports of every applicable analyzer on the IOI store and the IOI/ABC pair.

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
from typing import Any

import numpy as np
import xarray as xr
from rich.console import Console
from rich.table import Table

from headstore.cli.registry import AnalyzerSpec
from headstore.store_schema import HeadstoreError, open_store
from headstore.store_schema.layout import FIELDS, WEIGHTS

console = Console()

# On IOI prompts the token after END is padding: attribute the answer (the IO name) instead.
# Calibration runs in the census on text (4k predictions, chosen heads); per head on every IOI
# prompt's 270 heads it would cost minutes for a curve of a few hundred predictions.
IN_CENSUS_ONLY = {("ioi", "calibration")}
STORE_PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("ioi", "logit-attribution"): ("target=io_token",),
    ("ioi-abc", "logit-attribution"): ("target=io_token",),
}


@dataclass(frozen=True)
class MainJob:
    out: Path
    model: str = "smollm2-135m"
    n_ioi: int = 32
    n_text: int = 32
    text_seq_len: int = 128
    n_repeat: int = 16
    repeat_seq_len: int = 61  # BOS + 30 random tokens, twice
    batch_size: int = 8
    device: str = "auto"
    top: int = 3  # heads of each kind carried into the experiments


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


def _extract(job: MainJob, stage: Stages, data: str, fields: tuple[str, ...], **kw: object) -> Path:
    from headstore.extract import ExtractRequest, extract

    path = job.out / "stores" / f"{data}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(f"extract {data}"):
        res = extract(
            ExtractRequest(
                model=job.model, data=data, out=str(path), fields=fields, batch_size=job.batch_size,
                device=job.device, weights=str(_weights_dir(job)), **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        console.print(f"  {path}: {res.n_sequences} sequences ({res.skipped} batches already done)", highlight=False)
    return path


def _weights_dir(job: MainJob) -> Path:
    """The weights store the job's stores share (W_E, W_EE, W_U, ... written once per model)."""
    return job.out / "stores" / f"weights-{Path(job.model).name}.zarr"


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


def _result(folder: Path) -> xr.Dataset:
    return xr.open_zarr(folder / "result.zarr", consolidated=False).load()


def _params_digest(params: dict[str, Any]) -> str:
    """A short hash of analyzer options (arrays by their values)."""
    h = hashlib.sha256()
    for key in sorted(params):
        value = params[key]
        h.update(key.encode())
        h.update(np.asarray(value.values).tobytes() if isinstance(value, xr.DataArray) else repr(value).encode())
    return h.hexdigest()[:8]


class _Runner:
    """Runs one analyzer into ``OUT/census/TAG/NAME/`` unless a finished output is there (resume)."""

    def __init__(self, job: MainJob, stage: Stages):
        from headstore.cli.registry import analyzers

        self.job, self.stage, self.specs = job, stage, analyzers()

    def __call__(
        self, tag: str, name: str, stores: list[Path], params: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[Path]]:
        from headstore.cli.run import run_analyzer, saved_output

        if params:  # other heads or options are another result: never reuse one made with different ones
            tag += "-" + _params_digest(params)
        spec, out = self.specs[name], self.job.out / "census" / tag
        saved = saved_output(spec, out)
        if saved is not None:
            self.stage.skip(f"{name} ({tag})", "reused")
            paths = saved[1]
        else:
            with self.stage(f"{name} ({tag})"):
                _summary, paths = run_analyzer(spec, [str(s) for s in stores], out, params or {})
        return _result(paths[0].parent), [p for p in paths if p.suffix in (".html", ".png")]


def _heads_text(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"{L}.{h}" for L, h in heads) or "(none)"


def run_census(job: MainJob, stage: Stages, stores: dict[str, Path]) -> list[Path]:
    """The census and the seed experiments on chosen heads; writes ``OUT/census.html`` and ``OUT/census/findings.csv``."""
    import pandas as pd

    from headstore import census as C
    from headstore.cli.census_report import Section, write_census_report

    run = _Runner(job, stage)
    k = job.top
    ioi_ds = open_store(stores["ioi"])
    sections: list[Section] = []
    findings: list[dict[str, Any]] = []

    def found(kind: str, table: pd.DataFrame, definition: str) -> None:
        for rank, row in enumerate(table.head(k).itertuples(index=False)):
            findings.append({"kind": kind, "rank": rank + 1, "head": f"{row.layer}.{row.head}", "score": row.value,
                             "definition": definition})  # fmt: skip

    hs, hs_figs = run("repeated", "head-scores", [stores["repeated-random"]])
    kinds = {
        "previous-token": ("previous_token", "detect_head previous-token score, repeated random tokens"),
        "induction": ("induction", "detect_head induction score, repeated random tokens (ceiling ~0.49)"),
        "duplicate-token": ("duplicate_token", "detect_head duplicate-token score, repeated random tokens"),
        "BOS sink": ("bos", "mean attention to position 0, repeated random tokens"),
    }
    by_kind: dict[str, pd.DataFrame] = {}
    for label, (var, definition) in kinds.items():
        by_kind[label] = C.ranked(hs[var])
        found(label, by_kind[label], definition)
    median_induction = float(np.nanmedian(hs["induction"].values))
    _stats, stat_figs = run("repeated", "attention-stats", [stores["repeated-random"]])

    cs, cs_figs = run("ioi", "copy-suppression", [stores["ioi"]])
    by_kind["copy suppression"] = C.ranked(cs["score"], largest=False)
    found("copy suppression", by_kind["copy suppression"], "copy_suppression score on IOI prompts (most negative)")
    ioi_res, ioi_figs = run("ioi", "ioi", [stores["ioi"]])
    la_io, _ = run("ioi-target-io", "logit-attribution", [stores["ioi"]], {"target": ioi_ds["io_token"]})
    la_s, _ = run("ioi-target-s", "logit-attribution", [stores["ioi"]], {"target": ioi_ds["s_token"]})
    nm_table = C.name_mover_table(ioi_res, la_io, la_s)
    movers, negative = C.name_movers(nm_table, k), C.negative_name_movers(nm_table, k)
    found("name mover", movers, "attends END->IO > END->S1, direct effect on logit[IO] - logit[S] > 0 (largest)")
    found("negative name mover", negative, "attends END->IO > END->S1, direct effect on logit[IO] - logit[S] < 0")
    top_table = pd.DataFrame(findings)
    sections.append(Section(
        "Heads of every kind",
        f"SmolLM2's heads ranked per kind; the top {k} of each. Median induction score over all heads: "
        f"{median_induction:.3f}.",
        [("top heads", top_table)], [*hs_figs, *cs_figs, *ioi_figs],
    ))  # fmt: skip
    sections.append(Section("Attention statistics", "Entropy, attended distance and top-1 mass per head.", [],
                            stat_figs))  # fmt: skip

    comp, comp_figs = run("weights", "composition", [stores["ioi"]])
    prev, induction = C.heads_of(by_kind["previous-token"], k), C.heads_of(by_kind["induction"], k)
    kblock = C.composition_block(comp, prev, induction, "K")
    qblock = C.composition_block(comp, prev, induction, "Q")
    kblock["rank_among_earlier_heads"] = [
        C.rank_of_score(comp, "K", tuple(map(int, a.split("."))), tuple(map(int, b.split("."))))  # type: ignore[arg-type]
        for a, b in zip(kblock["A"], kblock["B"], strict=True)
    ]
    sections.append(Section(
        "Induction circuit: previous-token heads into induction heads",
        "K-composition (and Q) of the top previous-token heads (A) into the top induction heads (B), with z "
        "against the Gaussian baseline of the same shapes (a floor, not a null: typical pairs sit above it) and "
        "where A ranks among every earlier head composing into B (0 = strongest).",
        [("K-composition", kblock), ("Q-composition", qblock)], comp_figs,
    ))  # fmt: skip

    senders = C.heads_of(movers, k)
    # receivers: copy-suppressive heads that do attend END->IO more than END->S1 (the metric's subject)
    attends_io = nm_table["attn_io"] > nm_table["attn_s1"]
    receivers = C.heads_of(C.ranked(cs["score"], largest=False, where=attends_io), 2 * k)
    plans = C.patch_plans(senders, receivers, k=2)
    pp_rows, pp_figs = [], []
    for plan in plans:
        for direction, clean, corrupt in (("IOI<-ABC", "ioi", "ioi-abc"), ("ABC<-IOI", "ioi-abc", "ioi")):
            tag = f"patch-{plan.receiver[0]}.{plan.receiver[1]}-{direction.replace('<-', '-from-').lower()}"
            res, figs = run(tag, "path-patch-query", [stores[clean], stores[corrupt]],
                            {"senders": plan.senders, "receiver": plan.receiver})  # fmt: skip
            change = res["change"].values
            pp_rows.append({
                "direction": direction, "senders": _heads_text(plan.senders),
                "receiver": f"{plan.receiver[0]}.{plan.receiver[1]}", "clean_mean": float(res["clean"].mean()),
                "patched_mean": float(res["patched"].mean()), "change_mean": float(change.mean()),
                "frac_decreased": float((change < 0).mean()), "n_prompts": int(change.size),
            })  # fmt: skip
            pp_figs += figs
    pp_text = (
        f"Senders: the top name movers ({_heads_text(senders)}); receivers: the most copy-suppressive heads "
        "that attend END->IO more than END->S1 and that some sender precedes. The receiver's END->IO minus END->S1 attention, clean vs with the senders' "
        "outputs patched from the other dataset into its query (seed 001's histograms)."
    )
    if not plans:
        pp_text += " No copy-suppressive head sits after a name mover: nothing to patch."
    sections.append(Section("Path patching: name movers into copy-suppressive heads", pp_text,
                            [("per receiver and direction", pd.DataFrame(pp_rows))], pp_figs))  # fmt: skip

    chosen = list(dict.fromkeys([*senders, *C.heads_of(negative, k), *receivers[:k], *induction]))
    cal, cal_figs = run("text", "calibration", [stores["text"]], {"heads": chosen})
    cal_table = C.ranked(cal["overconfidence_change"], where=cal["selected"]).rename(
        columns={"value": "overconfidence_change"}
    )
    n_tok = int(open_store(stores["text"]).sizes["batch"]) * (job.text_seq_len - 1)
    sections.append(Section(
        "Calibration with heads removed (seed 003)",
        f"Top-3 calibration curve over {n_tok} next-token predictions of text; baseline overconfidence "
        f"{float(cal['overconfidence']):.4f}. Per head (the {len(chosen)} heads above only: all 270 would take "
        "about 5 minutes more on 2 CPU cores), the change when the head's direct effect is removed.",
        [("overconfidence change per chosen head", cal_table)], cal_figs,
    ))  # fmt: skip
    findings.append({"kind": "calibration", "rank": 0, "head": "-", "score": float(cal["overconfidence"]),
                     "definition": f"baseline overconfidence, top-3, {n_tok} text predictions"})  # fmt: skip

    (job.out / "census").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(findings).to_csv(job.out / "census" / "findings.csv", index=False)
    pd.DataFrame(pp_rows).to_csv(job.out / "census" / "path_patching.csv", index=False)
    kblock.to_csv(job.out / "census" / "induction_composition.csv", index=False)
    page = job.out / "census.html"
    with stage("census report"):
        write_census_report(
            page, f"Head census of {job.model}",
            f"Every head of {job.model} from its stores alone: {', '.join(f'{n} ({p.name})' for n, p in stores.items())}.",
            sections,
        )  # fmt: skip
    console.print(f"  [green]census[/green] {page}", highlight=False)
    t = Table("kind", "rank", "head", "score", title="census")
    for row in findings:
        t.add_row(str(row["kind"]), str(row["rank"]), str(row["head"]), f"{row['score']:.4g}")
    console.print(t)
    return [page, job.out / "census" / "findings.csv"]


def run_main_job(job: MainJob) -> list[Path]:
    """Extract, census, analyze, report. Rerunning resumes: finished stores and analyzer outputs are reused."""
    from headstore.cli.analyzer_section import plan
    from headstore.cli.registry import analyzers
    from headstore.cli.report import write_report
    from headstore.cli.run import run_analyzer, safe_child, saved_output

    stage = Stages()
    ioi = _extract(job, stage, "ioi", ("default", "k", "resid_pre"), n_seq=job.n_ioi)
    abc = _extract(job, stage, "ioi-abc", ("default", "k", "resid_pre"), n_seq=job.n_ioi)
    text = _extract(job, stage, "text", ("z", "resid_final", "ln_final_scale", "loss"), n_seq=job.n_text,
                    seq_len=job.text_seq_len, dtype="float16")  # fmt: skip
    rep = _extract(job, stage, "repeated-random", ("pattern",), n_seq=job.n_repeat, seq_len=job.repeat_seq_len,
                   dtype="float16")  # fmt: skip
    outputs = run_census(job, stage, {"ioi": ioi, "ioi-abc": abc, "text": text, "repeated-random": rep})
    # Each group of stores gets a folder of analyzer outputs, then a report built from them.
    groups = {"ioi": [ioi], "ioi-vs-abc": [ioi, abc]}
    by_weights: dict[tuple[str, ...], Path] = {}  # weights-only analyzer + weights -> its output folder
    comp = analyzers()["composition"]  # the census computed it already: copy, don't recompute
    by_weights[_weights_key(comp, [open_store(ioi)], ()) or ("",)] = safe_child(
        job.out / "census" / "weights", comp.name
    )
    for group, paths in groups.items():
        stores = [str(p) for p in paths]
        datasets = [open_store(s) for s in stores]
        to_run, _not_applicable = plan(analyzers(), datasets)
        for spec in (s for s in to_run if (group, s.name) not in IN_CENSUS_ONLY):
            name = f"{spec.name} on {group}"
            params = STORE_PARAMS.get((group, spec.name), ())
            folder = safe_child(job.out / group, spec.name)
            key = _weights_key(spec, datasets, params)
            saved, why = saved_output(spec, job.out / group), "reused"
            if saved is None and key in by_weights:
                _copy_output(by_weights[key], folder)
                saved, why = (
                    saved_output(spec, job.out / group),
                    f"same weights as {by_weights[key].parent.name}: copied",
                )
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
            exclude = {n: "in the census (census.html), on text" for g, n in IN_CENSUS_ONLY if g == group}
            write_report(stores, report, results=job.out / group, progress=False, exclude=exclude)
        console.print(f"  [green]report[/green] {report}", highlight=False)
        outputs.append(report)
    console.print(stage.table())
    return outputs
