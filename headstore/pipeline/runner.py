"""Running the declared analyzers for the main job, resuming from finished outputs: ``OUT/GROUP/NAME/`` is
written under a temporary name and renamed into place (``headstore.report.run``), so one that exists is
complete. A weights-only analyzer's output is keyed by the weights it read, so stores of one model share it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from headstore.analyze import registry
from headstore.analyze.registry import AnalyzerSpec
from headstore.pipeline.job import MainJob, Stages, weights_only
from headstore.report.run import run_analyzer, saved_output
from headstore.store_schema.hashing import content_sha256
from headstore.store_schema.layout import WEIGHTS


def weights_key(spec: AnalyzerSpec, datasets: list[xr.Dataset], params: Sequence[str]) -> tuple[str, ...] | None:
    """For an analyzer that reads weights only (circuits), what its result depends on; else None."""
    if len(datasets) != 1 or not weights_only(spec):
        return None
    ds = datasets[0]
    # Every stored weight (it may read optional ones, like W_EE), but the positional tables cut to
    # the store's seq_len unless it asks for them: stores of one model then share the key.
    positional = {w for w in WEIGHTS if "pos" in WEIGHTS[w].dims} - set(spec.requires)
    sha = content_sha256({n: ds[n].values for n in [*WEIGHTS, "vocab"] if n in ds and n not in positional})
    return (spec.name, sha, repr(ds["layer"].values.tolist()), repr(sorted(params)))


def copy_output(src: Path, dst: Path) -> None:
    """Copy a finished analyzer folder, complete or not at all (copied aside, then renamed)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)


def result(folder: Path) -> xr.Dataset:
    return xr.open_zarr(folder / "result.zarr", consolidated=False).load()


def params_digest(params: dict[str, Any]) -> str:
    """A short hash of analyzer options (arrays by their values)."""
    h = hashlib.sha256()
    for key in sorted(params):
        value = params[key]
        h.update(key.encode())
        h.update(np.asarray(value.values).tobytes() if isinstance(value, xr.DataArray) else repr(value).encode())
    return h.hexdigest()[:8]


class Runner:
    """Runs one analyzer into ``OUT/census/TAG/NAME/`` unless a finished output is there (resume)."""

    def __init__(self, job: MainJob, stage: Stages):
        self.job, self.stage, self.specs = job, stage, registry.analyzers()

    def __call__(
        self, tag: str, name: str, stores: list[Path], params: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[Path]]:
        if params:  # other heads or options are another result: never reuse one made with different ones
            tag += "-" + params_digest(params)
        spec, out = self.specs[name], self.job.out / "census" / tag
        saved = saved_output(spec, out)
        if saved is not None:
            self.stage.skip(f"{name} ({tag})", "reused")
            paths = saved[1]
        else:
            with self.stage(f"{name} ({tag})"):
                _summary, paths = run_analyzer(spec, [str(s) for s in stores], out, params or {})
        return result(paths[0].parent), [p for p in paths if p.suffix in (".html", ".png")]
