"""Stage 2 of the main job: the head census and the seeds' experiments on heads chosen from the data
(``headstore.pipeline.census`` says how each kind is chosen); writes ``OUT/census.html`` and
``OUT/census/findings.csv``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from rich.table import Table

from headstore.pipeline import census as C
from headstore.pipeline.census_attribution import attribution_section
from headstore.pipeline.job import MainJob, Stages, console, heads_text
from headstore.pipeline.runner import Runner
from headstore.report.census_report import Section, write_census_report
from headstore.store_schema import open_store

HEAD_KINDS = {
    "previous-token": ("previous_token", "detect_head previous-token score, repeated random tokens"),
    "induction": ("induction", "detect_head induction score, repeated random tokens (ceiling ~0.49)"),
    "duplicate-token": ("duplicate_token", "detect_head duplicate-token score, repeated random tokens"),
    "BOS sink": ("bos", "mean attention to position 0, repeated random tokens"),
}


class Census:
    """The census's state as its sections fill it: tables by kind, findings, page sections."""

    def __init__(self, job: MainJob, stage: Stages, stores: dict[str, Path]) -> None:
        self.job, self.stage, self.stores, self.k = job, stage, stores, job.top
        self.run = Runner(job, stage)
        self.ioi_ds = open_store(stores["ioi"])
        self.n_heads = len(self.ioi_ds.hs.heads)
        self.sections: list[Section] = []
        self.findings: list[dict[str, Any]] = []
        self.by_kind: dict[str, pd.DataFrame] = {}

    def found(self, kind: str, table: pd.DataFrame, definition: str) -> None:
        for rank, row in enumerate(table.head(self.k).itertuples(index=False)):
            self.findings.append({"kind": kind, "rank": rank + 1, "head": f"{row.layer}.{row.head}",
                                  "score": row.value, "definition": definition})  # fmt: skip

    def head_kinds(self) -> None:
        """Head scores on repeated random tokens, copy suppression and (negative) name movers on IOI."""
        run, stores, k = self.run, self.stores, self.k
        hs, hs_figs = run("repeated", "head-scores", [stores["repeated-random"]])
        for label, (var, definition) in HEAD_KINDS.items():
            self.by_kind[label] = C.ranked(hs[var])
            self.found(label, self.by_kind[label], definition)
        median_induction = float(np.nanmedian(hs["induction"].values))
        _stats, stat_figs = run("repeated", "attention-stats", [stores["repeated-random"]])
        cs, cs_figs = run("ioi", "copy-suppression", [stores["ioi"]])
        self.cs = cs
        self.by_kind["copy suppression"] = C.ranked(cs["score"], largest=False)
        self.found("copy suppression", self.by_kind["copy suppression"],
                   "copy_suppression score on IOI prompts (most negative)")  # fmt: skip
        ioi_res, ioi_figs = run("ioi", "ioi", [stores["ioi"]])
        la_io, _ = run("ioi-target-io", "logit-attribution", [stores["ioi"]], {"target": self.ioi_ds["io_token"]})
        la_s, _ = run("ioi-target-s", "logit-attribution", [stores["ioi"]], {"target": self.ioi_ds["s_token"]})
        self.nm_table = C.name_mover_table(ioi_res, la_io, la_s)
        self.movers, self.negative = C.name_movers(self.nm_table, k), C.negative_name_movers(self.nm_table, k)
        self.found("name mover", self.movers,
                   "attends END->IO > END->S1, direct effect on logit[IO] - logit[S] > 0 (largest)")  # fmt: skip
        self.found("negative name mover", self.negative,
                   "attends END->IO > END->S1, direct effect on logit[IO] - logit[S] < 0")  # fmt: skip
        self.sections.append(Section(
            "Heads of every kind",
            f"The {self.n_heads} heads of {self.job.model} ranked per kind; the top {k} of each. Median induction "
            f"score over all heads: {median_induction:.3f}.",
            [("top heads", pd.DataFrame(self.findings))], [*hs_figs, *cs_figs, *ioi_figs],
        ))  # fmt: skip
        self.sections.append(Section("Attention statistics", "Entropy, attended distance and top-1 mass per head.", [],
                                     stat_figs))  # fmt: skip

    def induction_circuit(self) -> None:
        """K- and Q-composition of the top previous-token heads into the top induction heads."""
        comp, comp_figs = self.run("weights", "composition", [self.stores["ioi"]])
        k = self.k
        prev, self.induction = C.heads_of(self.by_kind["previous-token"], k), C.heads_of(self.by_kind["induction"], k)
        kblock = C.composition_block(comp, prev, self.induction, "K")
        qblock = C.composition_block(comp, prev, self.induction, "Q")
        kblock["rank_among_earlier_heads"] = [
            C.rank_of_score(comp, "K", tuple(map(int, a.split("."))), tuple(map(int, b.split("."))))  # type: ignore[arg-type]
            for a, b in zip(kblock["A"], kblock["B"], strict=True)
        ]
        self.kblock = kblock
        self.sections.append(Section(
            "Induction circuit: previous-token heads into induction heads",
            "K-composition (and Q) of the top previous-token heads (A) into the top induction heads (B), with z "
            "against the Gaussian baseline of the same shapes (a floor, not a null: typical pairs sit above it) and "
            "where A ranks among every earlier head composing into B (0 = strongest).",
            [("K-composition", kblock), ("Q-composition", qblock)], comp_figs,
        ))  # fmt: skip

    def _patch_row(self, plan: C.PatchPlan, direction: str, res: xr.Dataset) -> dict[str, Any]:
        change = res["change"].values
        return {
            "direction": direction, "senders": heads_text(plan.senders),
            "receiver": f"{plan.receiver[0]}.{plan.receiver[1]}", "clean_mean": float(res["clean"].mean()),
            "patched_mean": float(res["patched"].mean()), "change_mean": float(change.mean()),
            "frac_decreased": float((change < 0).mean()), "n_prompts": int(change.size),
        }  # fmt: skip

    def path_patching(self) -> None:
        """Seed 001: the top name movers patched into the most copy-suppressive heads' queries, both ways."""
        k, stores = self.k, self.stores
        self.senders = C.heads_of(self.movers, k)
        # receivers: copy-suppressive heads that do attend END->IO more than END->S1 (the metric's subject)
        attends_io = self.nm_table["attn_io"] > self.nm_table["attn_s1"]
        self.receivers = C.heads_of(C.ranked(self.cs["score"], largest=False, where=attends_io), 2 * k)
        plans = C.patch_plans(self.senders, self.receivers, k=2)
        self.pp_rows: list[dict[str, Any]] = []
        pp_figs: list[Path] = []
        for plan in plans:
            for direction, clean, corrupt in (("IOI<-ABC", "ioi", "ioi-abc"), ("ABC<-IOI", "ioi-abc", "ioi")):
                tag = f"patch-{plan.receiver[0]}.{plan.receiver[1]}-{direction.replace('<-', '-from-').lower()}"
                res, figs = self.run(tag, "path-patch-query", [stores[clean], stores[corrupt]],
                                     {"senders": plan.senders, "receiver": plan.receiver})  # fmt: skip
                self.pp_rows.append(self._patch_row(plan, direction, res))
                pp_figs += figs
        pp_text = (
            f"Senders: the top name movers ({heads_text(self.senders)}); receivers: the most copy-suppressive heads "
            "that attend END->IO more than END->S1 and that some sender precedes. The receiver's END->IO minus END->S1 attention, clean vs with the senders' "
            "outputs patched from the other dataset into its query (seed 001's histograms)."
        )
        if not plans:
            pp_text += " No copy-suppressive head sits after a name mover: nothing to patch."
        self.sections.append(Section("Path patching: name movers into copy-suppressive heads", pp_text,
                                     [("per receiver and direction", pd.DataFrame(self.pp_rows))], pp_figs))  # fmt: skip

    def calibration(self) -> None:
        """Seed 003 on text: the calibration curve, and its change with each chosen head's direct effect removed."""
        k, job = self.k, self.job
        chosen = list(dict.fromkeys([*self.senders, *C.heads_of(self.negative, k), *self.receivers[:k],
                                     *self.induction]))  # fmt: skip
        cal, cal_figs = self.run("text", "calibration", [self.stores["text"]], {"heads": chosen})
        cal_table = C.ranked(cal["overconfidence_change"], where=cal["selected"]).rename(
            columns={"value": "overconfidence_change"}
        )
        n_tok = int(open_store(self.stores["text"]).sizes["batch"]) * (job.text_seq_len - 1)
        self.sections.append(Section(
            "Calibration with heads removed (seed 003)",
            f"Top-3 calibration curve over {n_tok} next-token predictions of text; baseline overconfidence "
            f"{float(cal['overconfidence']):.4f}. Per head (the {len(chosen)} heads above only: all {self.n_heads} "
            f"heads of {job.model} would take minutes more), the change when the head's direct effect is removed.",
            [("overconfidence change per chosen head", cal_table)], cal_figs,
        ))  # fmt: skip
        self.findings.append({"kind": "calibration", "rank": 0, "head": "-", "score": float(cal["overconfidence"]),
                              "definition": f"baseline overconfidence, top-3, {n_tok} text predictions"})  # fmt: skip

    def attribution(self) -> None:
        """AtP of every head (IOI clean, ABC corrupt), AtP vs exact patching on the live model, the top EAP edges
        beside the name movers (``headstore.pipeline.census_attribution``)."""
        section, findings = attribution_section(self.job, self.stage, self.run, self.stores, self.movers)
        self.sections.append(section)
        self.findings.extend(findings)

    def write(self) -> list[Path]:
        """The CSV tables, the census page, and the findings printed as a table."""
        job, stores = self.job, self.stores
        (job.out / "census").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.findings).to_csv(job.out / "census" / "findings.csv", index=False)
        pd.DataFrame(self.pp_rows).to_csv(job.out / "census" / "path_patching.csv", index=False)
        self.kblock.to_csv(job.out / "census" / "induction_composition.csv", index=False)
        page = job.out / "census.html"
        with self.stage("census report"):
            write_census_report(
                page, f"Head census of {job.model}",
                f"Every head of {job.model} from its stores alone: "
                f"{', '.join(f'{n} ({p.name})' for n, p in stores.items())}.",
                self.sections,
            )  # fmt: skip
        console.print(f"  [green]census[/green] {page}", highlight=False)
        t = Table("kind", "rank", "head", "score", title="census")
        for row in self.findings:
            t.add_row(str(row["kind"]), str(row["rank"]), str(row["head"]), f"{row['score']:.4g}")
        console.print(t)
        return [page, job.out / "census" / "findings.csv"]


def run_census(job: MainJob, stage: Stages, stores: dict[str, Path]) -> list[Path]:
    """The census and the seed experiments on chosen heads; writes ``OUT/census.html`` and ``OUT/census/findings.csv``."""
    census = Census(job, stage, stores)
    census.head_kinds()
    census.induction_circuit()
    census.path_patching()
    census.attribution()
    census.calibration()
    return census.write()
