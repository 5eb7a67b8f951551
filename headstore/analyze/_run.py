"""Run an analyzer for the CLI: open stores, compute (optionally on a dask cluster), write outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from headstore.analyze._registry import AnalyzerSpec
from headstore.store_schema import HeadstoreError, open_store


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
    params: dict[str, Any],
    scheduler: str | None = None,
    partial: bool = False,
) -> tuple[pd.DataFrame, list[Path]]:
    if len(stores) != spec.n_stores:
        raise HeadstoreError(f"{spec.name} takes {spec.n_stores} store(s), got {len(stores)}")
    datasets = [open_store(s, partial=partial) for s in stores]
    folder = safe_child(out, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    with dask_scheduler(scheduler):
        result: xr.Dataset = spec.func(*datasets, **params).compute()
    result.attrs = {k: v for k, v in result.attrs.items() if isinstance(v, str | int | float)}
    result.to_zarr(folder / "result.zarr", mode="w", consolidated=False, zarr_format=3)
    summary = spec.summary(result)
    summary.to_csv(folder / "summary.csv", index=False)
    paths = [folder / "result.zarr", folder / "summary.csv", *spec.plot(result, folder)]
    return summary, paths
