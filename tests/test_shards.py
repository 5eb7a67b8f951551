"""Sharded extraction: concurrent ``--shard i/N`` processes fill one store equal to a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from headstore.store_schema import open_store

N_SEQ, BATCH = 16, 4  # four batches: shard 0/2 owns sequences [0, 8), shard 1/2 owns [8, 16)
EXTRACT = ["--model", "tiny-gpt2", "--data", "ioi", "--n-seq", str(N_SEQ), "--batch-size", str(BATCH)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "headstore.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}


def _extract(out: Path, shard: str) -> subprocess.Popen[str]:
    cmd = _cli("extract", *EXTRACT, "--out", str(out), "--device", "cpu", "--shard", shard, "--no-progress")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait(p: subprocess.Popen[str]) -> str:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    return stdout


def _info(store: Path) -> dict[str, object]:
    proc = subprocess.run(_cli("info", str(store), "--json"), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, object] = json.loads(proc.stdout)
    return out


@pytest.fixture(scope="module")
def single(make_store: Callable[..., Path]) -> Path:
    return make_store("tiny-gpt2", "ioi", n_seq=N_SEQ, batch_size=BATCH)


def _assert_same_arrays(a: Path, b: Path) -> None:
    ga = zarr.open_group(str(a), mode="r", zarr_format=3)
    gb = zarr.open_group(str(b), mode="r", zarr_format=3)
    names = sorted(ga.array_keys())
    assert names == sorted(gb.array_keys())
    for name in names:
        x, y = ga[name], gb[name]
        assert isinstance(x, zarr.Array) and isinstance(y, zarr.Array)
        assert x.shape == y.shape and x.dtype == y.dtype and x.chunks == y.chunks, name
        xv, yv = np.asarray(x[...]), np.asarray(y[...])
        if xv.dtype.kind in "fc":
            assert np.array_equal(xv, yv, equal_nan=True), name
        else:
            assert np.array_equal(xv, yv), name
    # Provenance: identical except the creation time and library versions.
    pa, pb = dict(ga.attrs["headstore"]), dict(gb.attrs["headstore"])  # type: ignore[arg-type]
    for key in ("created", "versions"):
        pa.pop(key, None)
        pb.pop(key, None)
    assert pa == pb


def test_concurrent_shards_equal_single_process(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded.zarr"
    procs = [_extract(out, "0/2"), _extract(out, "1/2")]  # both race to create the store
    logs = [_wait(p) for p in procs]
    assert all("wrote 2 batches" in log for log in logs), logs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary creation folder left behind"
    info = _info(out)
    assert info["n_complete"] == N_SEQ
    assert info["done_ranges"] == [[0, N_SEQ]]
    _assert_same_arrays(out, single)
    ds = open_store(out)  # complete: opens without --partial
    assert ds.sizes["batch"] == N_SEQ


def test_one_shard_then_the_other(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.zarr"
    _wait(_extract(out, "0/2"))
    info = _info(out)
    assert info["n_sequences"] == N_SEQ
    assert info["n_complete"] == N_SEQ // 2
    assert info["done_ranges"] == [[0, N_SEQ // 2]]
    assert open_store(out, partial=True).sizes["batch"] == N_SEQ // 2
    # Rerunning shard 0 does nothing; shard 1 finishes the store.
    assert "wrote 0 batches, 2 already done" in _wait(_extract(out, "0/2"))
    _wait(_extract(out, "1/2"))
    assert _info(out)["done_ranges"] == [[0, N_SEQ]]
    _assert_same_arrays(out, single)


def test_partial_store_keeps_sequence_numbers(single: Path, tmp_path: Path) -> None:
    """Only shard 1/2 written: the partial Dataset's rows are sequences 8..15 and say so (``batch``), holding the
    single-process store's rows 8..15 (read with zarr); analyzers keep the labels, and pairing it with a whole
    store is refused by name until the two are aligned."""
    import xarray as xr

    from headstore.analyze import ioi, ioi_pair
    from headstore.store_schema import HeadstoreError

    out = tmp_path / "second-half.zarr"
    _wait(_extract(out, "1/2"))
    part, whole = open_store(out, partial=True), open_store(single)
    second = list(range(N_SEQ // 2, N_SEQ))
    assert part["batch"].values.tolist() == second
    tokens = zarr.open_array(str(single / "tokens"), mode="r", zarr_format=3)
    np.testing.assert_array_equal(part["tokens"].values, np.asarray(tokens[N_SEQ // 2 :]))
    np.testing.assert_array_equal(part["tokens"].sel(batch=9).values, np.asarray(tokens[9]))
    diff = ioi(part)["logit_diff"].compute()
    assert diff["batch"].values.tolist() == second
    np.testing.assert_allclose(diff.values, ioi(whole)["logit_diff"].values[N_SEQ // 2 :], rtol=1e-6)
    with pytest.raises(HeadstoreError, match=r"ioi-pair: the two stores hold different sequences \(\[8, 9, 10, 11"):
        ioi_pair(part, whole)
    a, b = xr.align(part, whole, join="inner")
    assert ioi_pair(a, b)["logit_diff_abc"]["batch"].values.tolist() == second
