"""An analysis on a dask.distributed LocalCluster (worker processes) equals the threaded scheduler."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from headstore.analyze import copy_suppression
from headstore.analyze._maths import logits
from headstore.cli.registry import analyzers
from headstore.cli.run import dask_scheduler
from headstore.store_schema import HeadstoreError, open_store

pytest.importorskip("distributed")


def analysis(ds: xr.Dataset) -> xr.Dataset:
    """copy_suppression, a per-head reduction and the recomputed logits, in one lazy Dataset."""
    lg = logits(ds)
    extra = xr.Dataset(
        {
            "pattern_sum": ds["pattern"].sum(["query_pos", "key_pos"]),
            "result_norm": (ds["result"].astype("float32") ** 2).sum("d_model"),
            "logit_max": lg.max("d_vocab"),
            "logit_lse": np.log(np.exp(lg).sum("d_vocab")),  # type: ignore[arg-type]
        }
    )
    return xr.merge([copy_suppression(ds), extra], combine_attrs="drop")


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from distributed import LocalCluster

    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def tiny_store(make_store: Callable[..., Path]) -> Path:
    return make_store("tiny-gpt2", "ioi")


def _assert_close(a: xr.Dataset, b: xr.Dataset) -> None:
    assert set(a.data_vars) == set(b.data_vars)
    for k in a.data_vars:
        x, y = np.asarray(a[k].values), np.asarray(b[k].values)
        assert x.shape == y.shape, k
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=k)
        else:
            assert np.array_equal(x, y), k


def test_distributed_equals_threaded(tiny_store: Path, cluster: object) -> None:
    from distributed import get_client

    threaded = analysis(open_store(tiny_store)).compute(scheduler="threads")
    with dask_scheduler(cluster.scheduler_address):  # type: ignore[attr-defined]
        client = get_client()
        assert len(client.scheduler_info()["workers"]) == 2
        dist = analysis(open_store(tiny_store)).compute()
    _assert_close(threaded, dist)


def test_unreachable_scheduler_is_a_clear_error() -> None:
    port = 1  # nothing listens on tcp port 1 of localhost
    with pytest.raises(HeadstoreError, match="scheduler"), dask_scheduler(f"tcp://127.0.0.1:{port}"):
        pass


def test_cli_analyze_on_cluster(tiny_store: Path, cluster: object, tmp_path: Path) -> None:
    spec = analyzers()["copy-suppression"]
    addr = cluster.scheduler_address  # type: ignore[attr-defined]
    outs = {}
    for label, extra in (("threads", []), ("cluster", ["--scheduler", addr])):
        out = tmp_path / label
        cmd = [sys.executable, "-m", "headstore.cli", "analyze", spec.name, str(tiny_store), "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[label] = xr.open_zarr(out / spec.name / "result.zarr", zarr_format=3, consolidated=False).load()
    _assert_close(outs["threads"], outs["cluster"])
