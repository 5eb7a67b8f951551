"""Stores read over HTTP (a real http.server) and S3 (moto's standalone server) equal the local copy."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import xarray as xr

from headstore.analyze import copy_suppression
from headstore.analyze._maths import logits
from headstore.cli.serve import RangeRequestHandler
from headstore.store_schema import open_store


def analysis(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """An analyzer's result (copy suppression) plus a reduction and the recomputed logits."""
    out = {
        "pattern_sum": ds["pattern"].sum(["query_pos", "key_pos"]).values,
        "logits": logits(ds).values,
        "result": ds["result"].values,
    }
    res = copy_suppression(ds).compute()
    out.update({f"cs_{k}": np.asarray(v.values) for k, v in res.data_vars.items()})
    assert {"cs_per_position", "cs_per_sequence", "cs_score"} <= set(out)
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=True), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _QuietHandler(RangeRequestHandler):  # sharded stores are read with byte ranges
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        _QuietHandler.requests.append(f"{self.command} {self.path}")


@pytest.fixture(scope="module")
def tiny_store(make_store: Callable[..., Path]) -> Path:
    return make_store("tiny-gpt2", "ioi")


@pytest.fixture()
def http_root(tiny_store: Path, tmp_path: Path) -> Iterator[str]:
    shutil.copytree(tiny_store, tmp_path / "store.zarr")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_store_equals_local(tiny_store: Path, http_root: str) -> None:
    _QuietHandler.requests.clear()
    remote = open_store(f"{http_root}/store.zarr")
    local = open_store(tiny_store)
    assert set(remote.data_vars) == set(local.data_vars)
    assert remote.attrs == local.attrs
    assert_same(analysis(remote), analysis(local))
    # Consolidated metadata: a plain HTTP server cannot list folders, and nothing needed to.
    assert _QuietHandler.requests
    assert all(r.startswith(("GET", "HEAD")) for r in _QuietHandler.requests)


def test_http_open_store_reads_each_group_metadata_once(tiny_store: Path, http_root: str) -> None:
    """One metadata request per group: the root ``zarr.json`` (consolidated: every array's metadata with it) is
    fetched once by ``open_store``, not once per step (provenance, manifest, arrays, guarded reads)."""
    _QuietHandler.requests.clear()
    ds = open_store(f"{http_root}/store.zarr")
    metadata = [r for r in _QuietHandler.requests if r.endswith("zarr.json")]
    assert metadata == ["GET /store.zarr/zarr.json"], _QuietHandler.requests
    ds["v"].isel(batch=0).values  # noqa: B018  (data reads ask for chunks, never metadata again)
    assert [r for r in _QuietHandler.requests if r.endswith("zarr.json")] == metadata
    assert any("/store.zarr/v/c/" in r for r in _QuietHandler.requests)


def test_http_missing_store_is_a_clear_error(http_root: str) -> None:
    from headstore.store_schema import HeadstoreError

    with pytest.raises(HeadstoreError):
        open_store(f"{http_root}/nothing.zarr")


def test_http_server_without_range_requests_is_refused_by_name(tiny_store: Path, tmp_path: Path) -> None:
    """Python's http.server sends whole files for a Range request: a sharded store says so, in one line."""
    from headstore.store_schema import HeadstoreError

    shutil.copytree(tiny_store, tmp_path / "store.zarr")

    class Plain(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Plain, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(HeadstoreError, match=r"ignores HTTP Range requests.*headstore serve") as ei:
            open_store(f"http://127.0.0.1:{server.server_address[1]}/store.zarr")
        assert "\n" not in str(ei.value)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    for k, v in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": "x",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_store_equals_local(tiny_store: Path, s3_endpoint: str) -> None:
    import s3fs

    opts = {"endpoint_url": s3_endpoint, "key": "x", "secret": "x"}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("headstore-test")
    fs.put(str(tiny_store), "headstore-test/store.zarr", recursive=True)
    n_local = sum(len(files) for _, _, files in os.walk(tiny_store))
    assert len(fs.find("headstore-test/store.zarr")) == n_local
    remote = open_store("s3://headstore-test/store.zarr", storage_options=opts)
    local = open_store(tiny_store)
    assert remote.attrs == local.attrs
    assert_same(analysis(remote), analysis(local))


# --- a missing optional package: one line naming what to install ---------------------------------------


@pytest.fixture()
def unimportable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``unimportable("s3fs", forget=("fsspec.implementations.http",))``: ``import s3fs`` fails as if it were not
    installed, and the modules in ``forget`` (and fsspec's cached filesystems) are imported afresh; modules
    first imported meanwhile are dropped afterwards."""
    registry = sys.modules["fsspec.registry"]._registry  # type: ignore[attr-defined]
    before = set(sys.modules)

    def hide(*names: str, forget: tuple[str, ...] = ()) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
        for key in [k for k in sys.modules if k.startswith(forget)] if forget else []:
            monkeypatch.delitem(sys.modules, key)
        for proto in list(registry):
            monkeypatch.delitem(registry, proto)

    yield hide
    monkeypatch.undo()
    for key in set(sys.modules) - before:
        del sys.modules[key]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_missing_s3fs_is_one_line_naming_the_remote_extra(unimportable: Callable[..., None]) -> None:
    from headstore.store_schema import HeadstoreError

    unimportable("s3fs")
    with pytest.raises(HeadstoreError) as ei:
        open_store("s3://bucket/store.zarr")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("reading s3:// stores (s3://bucket/store.zarr) needs s3fs"), msg
    assert msg.endswith("pip install 'headstore[remote]'"), msg
    assert any(d.startswith("s3fs") for d in _pyproject()["project"]["optional-dependencies"]["remote"])


def test_http_needs_no_extra_and_a_missing_aiohttp_says_so(unimportable: Callable[..., None]) -> None:
    """aiohttp and requests are core dependencies (``pip install headstore`` reads over HTTP); without them the
    error names the package, not fsspec's ``HTTPFileSystem requires ...``."""
    from headstore.store_schema import HeadstoreError

    core = {re.split(r"[<>=\[ ]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert {"aiohttp", "requests", "fsspec"} <= core
    unimportable("aiohttp", forget=("fsspec.implementations.http",))
    with pytest.raises(HeadstoreError) as ei:
        open_store("http://127.0.0.1:9/store.zarr")
    msg = str(ei.value)
    assert "\n" not in msg and "needs aiohttp, which is not installed: pip install aiohttp" in msg, msg
    assert "HTTPFileSystem" not in msg


def test_extract_without_torch_is_one_line_naming_the_extract_extra(
    unimportable: Callable[..., None], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from headstore.cli import app

    unimportable("torch", forget=("headstore.extract",))
    out = tmp_path / "s.zarr"
    res = CliRunner().invoke(app, ["extract", "--model", "tiny-gpt2", "--data", "ioi", "--out", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0] == "error: extraction needs torch, which is not installed: pip install 'headstore[extract]'"
    assert not out.exists()


def test_every_extra_named_in_errors_is_in_pyproject() -> None:
    from headstore.store_schema.errors import CORE, EXTRAS

    extras = _pyproject()["project"]["optional-dependencies"]
    core = {re.split(r"[<>=\[ ]", d)[0].replace("-", "_") for d in _pyproject()["project"]["dependencies"]}
    assert set(CORE) <= core
    for module, extra in EXTRAS.items():
        assert module in {re.split(r"[<>=\[ ]", d)[0].replace("-", "_") for d in extras[extra]}, (module, extra)
