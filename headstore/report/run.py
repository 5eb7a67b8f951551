"""Run a declared analyzer for the CLI, the report and the main job: open stores, compute (optionally on a dask cluster), write outputs.

An analyzer's outputs live in ``OUT/NAME/`` (``result.zarr``, ``summary.csv``, plots listed in ``plots.txt``). They are
written under a temporary name and renamed into place, so an existing ``OUT/NAME/`` is always
complete: ``saved_output`` reads it back instead of computing again (main job resume, report).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from headstore.analyze.registry import AnalyzerSpec
from headstore.report.presenters import Presenter, presenter
from headstore.store_schema import HeadstoreError, open_store

PLOTS = "plots.txt"  # the plot files, in the order the presenter's ``plot`` returned them


@contextlib.contextmanager
def dask_scheduler(address: str | None) -> Iterator[None]:
    """Threaded scheduler by default; a dask.distributed client when an address is given."""
    if address is None:
        yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout="10s")
    except OSError as e:
        raise HeadstoreError(f"cannot reach dask scheduler {address!r} ({e}): start one or drop --scheduler") from e
    with client:
        yield


@contextlib.contextmanager
def progress_bar(show: bool) -> Iterator[None]:
    """dask's text progress bar over every computation inside (threaded scheduler; a cluster has its dashboard)."""
    if not show:
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=1.0, dt=0.5):
        yield


def safe_child(out: Path, name: str) -> Path:
    """``out/name``, refusing any name that would escape ``out``."""
    base = out.resolve()
    child = (base / name).resolve()
    if base not in child.parents:
        raise HeadstoreError(f"output name {name!r} would escape the output folder {out}")
    return child


def run_analyzer(
    spec: AnalyzerSpec,
    stores: Sequence[str],
    out: Path,
    params: Mapping[str, Any] | None = None,
    *,
    scheduler: str | None = None,
    partial: bool = False,
    progress: bool = False,
    shown: Presenter | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Compute ``spec`` on the stores and write ``out/NAME/``, replacing what was there.

    ``params``: Python keyword arguments (the CLI parses its ``--param`` strings first: ``headstore.cli.run``);
    ``shown``: the summary and figure (default: the analyzer's, ``headstore.report.presenters``)."""
    if len(stores) != spec.n_stores:
        raise HeadstoreError(f"{spec.name} takes {spec.n_stores} store(s), got {len(stores)}")
    datasets = [open_store(s, partial=partial) for s in stores]
    params = dict(params or {})
    missing = [
        p.name
        for p in inspect.signature(spec.func).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty and p.name not in params
    ]
    if missing:  # a one-line error, not the TypeError of the call
        need = " ".join(f"--param {name}=..." for name in missing)
        raise HeadstoreError(f"{spec.name} needs {need} (no default)")
    folder = safe_child(out, spec.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with dask_scheduler(scheduler), progress_bar(progress and scheduler is None):
            lazy: xr.Dataset = spec.func(*datasets, **params)
            lazy.attrs = {k: v for k, v in lazy.attrs.items() if isinstance(v, str | int | float)}
            if scheduler is None and _streamable(lazy):
                # written block by block as dask computes it: memory holds a few blocks, not the result
                # (copy-suppression's per_position is n_layers x n_heads floats per token), then read
                # back lazily for the summary and plots
                _portable_strings(lazy).to_zarr(tmp / "result.zarr", mode="w", consolidated=False, zarr_format=3)
                result = xr.open_zarr(tmp / "result.zarr", consolidated=False, zarr_format=3)[list(lazy.data_vars)]
            else:  # results on a cluster come back to this process (its workers may not see this folder)
                result = lazy.compute()
                _portable_strings(result).to_zarr(tmp / "result.zarr", mode="w", consolidated=False, zarr_format=3)
        shown = shown or presenter(spec.name)
        summary = shown.summary(result)
        summary.to_csv(tmp / "summary.csv", index=False)
        plots = [p.relative_to(tmp) for p in shown.plot(result, tmp)]
        (tmp / PLOTS).write_text("".join(f"{p.as_posix()}\n" for p in plots), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # replace: move the old one aside first, so the rename below is atomic
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        shutil.rmtree(old)
    tmp.rename(folder)
    return summary, [folder / "result.zarr", folder / "summary.csv", *(folder / p for p in plots)]


def _streamable(ds: xr.Dataset) -> bool:
    """Whether ``to_zarr`` can write ``ds`` as it is computed: its dask arrays' chunks are regular (equal
    along each dim but the last), which zarr needs, and it has no string arrays left lazy."""
    for var in ds.variables.values():
        if var.chunks is None:
            continue
        if var.dtype.kind in "UOT":
            return False
        for sizes in var.chunks:
            if len(sizes) > 1 and (len(set(sizes[:-1])) > 1 or sizes[-1] > sizes[0]):
                return False
    return True


def _portable_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings as objects, so zarr writes its variable-length UTF-8 string dtype
    (which has a Zarr v3 spec) instead of FixedLengthUTF32 (which has none, and warns)."""
    fixed = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind == "U"}
    coords = {k: v for k, v in fixed.items() if k in ds.coords}
    return ds.assign_coords(coords).assign({k: v for k, v in fixed.items() if k not in coords})


def saved_output(spec: AnalyzerSpec, out: Path) -> tuple[pd.DataFrame, list[Path]] | None:
    """What ``run_analyzer(spec, ..., out, ...)`` returned when it last ran, read back from
    ``out/NAME/``; None when that folder is not there (or not complete)."""
    folder = safe_child(out, spec.name)
    if not all((folder / f).is_file() for f in ("result.zarr/zarr.json", "summary.csv", PLOTS)):
        return None
    plots = [folder / line for line in (folder / PLOTS).read_text(encoding="utf-8").splitlines() if line]
    return pd.read_csv(folder / "summary.csv"), [folder / "result.zarr", folder / "summary.csv", *plots]
