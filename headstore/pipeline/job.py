"""The main job's settings, its stage timer, and what it decides from the analyzers' declarations: the
fields each store is extracted with, and which analyzers read weights only."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from headstore.analyze.registry import AnalyzerSpec, get_analyzer
from headstore.store_schema import HeadstoreError
from headstore.store_schema.layout import FIELDS, GRAD_FIELDS, PRESETS

console = Console()

# The fields the store derives when they are not stored: extract their sources instead.
DERIVED_FROM = {"result": "z"}


@dataclass(frozen=True)
class MainJob:
    out: Path
    model: str = "smollm2-135m"
    n_ioi: int = 32
    n_text: int = 32
    text_seq_len: int = 128
    text_data: str | None = None  # --data of the text store (hf:NAME...); None: the stdlib docstrings dataset
    n_repeat: int = 16
    repeat_seq_len: int = 61  # BOS + 30 random tokens, twice
    batch_size: int = 8
    device: str = "auto"
    top: int = 3  # heads of each kind carried into the experiments


@dataclass(frozen=True)
class StorePlan:
    """A store of the main job: its data source, the fields it keeps beyond what its analyzers declare
    (``base``: presets and field names), the analyzers the census runs on it, and the metric whose gradients it
    stores (``extract --grad``; its gradient fields and ``resid_pre`` come with it), if any."""

    data: str
    base: tuple[str, ...]
    analyzers: tuple[str, ...]
    grad: str | None = None


IOI_ANALYZERS = ("copy-suppression", "ioi", "logit-attribution", "composition", "path-patch-query",
                 "attribution-patching", "edge-attribution")  # fmt: skip
# The IOI metric the attribution analyzers take gradients of: logit[IO] - logit[S] at END.
IOI_METRIC = "logit-diff:io_token,s_token@end_pos"
# Explicit fields per store, not extract's default (auto): the IOI stores keep "default" (pattern and z stored:
# at ~18 tokens both are small, and the analyzers read them without deriving); the others store exactly what
# their analyzers declare (text: z for calibration; repeated-random: pattern at 61 tokens, smaller than q + k).
STORES = {
    "ioi": StorePlan("ioi", ("default",), IOI_ANALYZERS, IOI_METRIC),
    "ioi-abc": StorePlan("ioi-abc", ("default",), IOI_ANALYZERS, IOI_METRIC),
    "text": StorePlan("text", ("loss",), ("calibration",)),
    "repeated-random": StorePlan("repeated-random", (), ("head-scores", "attention-stats")),
}


def weights_only(spec: AnalyzerSpec) -> bool:
    """An analyzer that reads no per-sequence field (circuits, composition): its result depends on the weights."""
    return spec.n_stores == 1 and not any(r in FIELDS for r in spec.requires)


def declared_fields(names: Iterable[str]) -> tuple[str, ...]:
    """The store fields the named analyzers declare (``result`` as ``z``, which the store derives it from)."""
    wanted = {DERIVED_FROM.get(r, r) for name in names for r in get_analyzer(name).requires if r in FIELDS}
    return tuple(f for f in FIELDS if f in wanted)


def extract_fields(plan: StorePlan) -> tuple[str, ...]:
    """The ``fields`` of a store: its base plus whatever its analyzers declare that the base lacks (gradient
    fields excepted: ``extract --grad`` adds them, with ``resid_pre``, when the plan names a metric)."""
    have = {"tokens", *(f for item in plan.base for f in PRESETS.get(item, (item,)))}
    if plan.grad is not None:
        have |= {*GRAD_FIELDS, "resid_pre"}
    return (*plan.base, *(f for f in declared_fields(plan.analyzers) if f not in have))


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


def heads_text(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"{L}.{h}" for L, h in heads) or "(none)"
