"""Every ```python and ```bash block of README.md and docs/*.md runs, as written, in CI.

Each markdown file runs in a temporary folder of its own, its blocks in order: bash blocks with
``bash -euo pipefail``, python blocks in one interpreter per file (so a later block sees an earlier
one's names, as in a notebook). Two things are arranged around the blocks, never inside them:

- a few names in the docs stand for a server the reader runs: ``http://HOST:8000`` (a static file
  server, started here over the file's folder), ``tcp://HOST:8786`` (a dask scheduler, started
  here), ``s3://bucket`` with ``http://minio:9000`` (a moto S3 server with the folder's stores
  uploaded); these are substituted;
- a block preceded by ``<!-- docs-test: skip REASON -->`` is not run (the README's own two set-up
  commands, which are CI itself, and commands that start a server that never returns); the test
  checks that each skip gives a reason and that no more than a handful are skipped.

A store a file reads before it makes one (``tiny-ioi.zarr`` in sharing.md) is prepared here first, and the
checkout's folders a file names as a reader in a checkout would (``bench/configs`` in scale.md) are copied in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from headstore.cli.serve import RangeRequestHandler

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(.*?)-->\s*$")
MAX_SKIPPED = 8
# stores a file reads without making them: (name, extract arguments)
PREPARED = {
    "sharing.md": [("tiny-ioi.zarr", ["--model", "tiny-gpt2", "--data", "ioi", "--n-seq", "8", "--batch-size", "4"])],
}

# folders of the checkout a file reads, relative to the repository root (copied into its folder)
CHECKOUT = {"scale.md": ["bench/configs"]}


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    code: str
    skip: str | None


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang not in ("python", "bash", "sh", "console"):
            continue
        line = text[: m.start()].count("\n") + 1
        before = text[: m.start()].rstrip("\n").splitlines()[-1:] or [""]
        skip = SKIP.search(before[0])
        out.append(Block(path.name, line, lang, m.group(2), skip.group(1).strip() if skip else None))
    return out


ALL = [b for p in DOCS for b in blocks(p)]


def test_every_doc_has_its_blocks_found() -> None:
    assert len(ALL) >= 15, "the docs lost their examples, or the fence pattern broke"
    skipped = [b for b in ALL if b.skip is not None]
    assert all(b.skip for b in skipped), [f"{b.file}:{b.line}" for b in skipped if not b.skip]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.file}:{b.line} {b.skip}" for b in skipped]
    assert all(b.lang in ("python", "bash") for b in ALL), "use ```python or ```bash for runnable blocks"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Servers:
    http: str
    scheduler: str
    s3: str


class _Quiet(RangeRequestHandler):  # what `headstore serve` runs: byte ranges, as sharded stores need
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Servers, Path]]:
    """An http server over ``root``, a dask scheduler with one worker, and a moto S3 server."""
    from distributed import LocalCluster
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("served")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    import fsspec.config

    # the scheduler's workers run in this process: give their s3fs the moto endpoint and dummy keys
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {**saved_conf, "endpoint_url": f"http://127.0.0.1:{port}", "key": "x", "secret": "x"}
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=None)
    try:
        yield (
            Servers(f"127.0.0.1:{httpd.server_address[1]}", cluster.scheduler_address, f"http://127.0.0.1:{port}"),
            root,
        )
    finally:
        cluster.close()
        fsspec.config.conf["s3"] = saved_conf
        moto.stop()
        httpd.shutdown()


def _substitute(code: str, s: Servers) -> str:
    return (
        code.replace("http://HOST:8000", f"http://{s.http}")
        .replace("tcp://HOST:8786", s.scheduler)
        .replace("http://minio:9000", s.s3)
    )


DRIVER = r"""
import contextlib, json, sys, traceback
ns = {"__name__": "__main__"}
for line in sys.stdin:
    req = json.loads(line)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the block's prints stay off the reply channel
            exec(compile(req["code"], req["where"], "exec"), ns)
        print(json.dumps({"ok": True}), flush=True)
    except BaseException:
        print(json.dumps({"ok": False, "error": traceback.format_exc()[-4000:]}), flush=True)
"""


def _upload(folder: Path, endpoint: str) -> None:
    """Every store of ``folder`` to s3://bucket/ on the moto server."""
    import s3fs

    fs = s3fs.S3FileSystem(key="x", secret="x", client_kwargs={"endpoint_url": endpoint})
    if not fs.exists("bucket"):
        fs.mkdir("bucket")
    for store in folder.glob("*.zarr"):
        fs.put(str(store), f"bucket/{store.name}", recursive=True)


@pytest.mark.parametrize("doc", [p.name for p in DOCS if any(b.skip is None for b in blocks(p))])
def test_doc_blocks_run(doc: str, tmp_path: Path, servers: tuple[Servers, Path]) -> None:
    srv, served = servers
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
        "FSSPEC_S3_ENDPOINT_URL": srv.s3, "MPLBACKEND": "Agg",
    }  # fmt: skip
    cli = [sys.executable, "-m", "headstore.cli"]
    for folder in CHECKOUT.get(doc, []):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    for name, args in PREPARED.get(doc, []):
        subprocess.run([*cli, "extract", *args, "--out", name, "--no-progress"], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=600)  # fmt: skip
    bin_dir = tmp_path / ".bin"  # `headstore` on PATH, running this checkout
    bin_dir.mkdir()
    (bin_dir / "headstore").write_text(f'#!/bin/sh\nexec {sys.executable} -m headstore.cli "$@"\n')
    (bin_dir / "headstore").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    py = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=tmp_path, env=env)  # fmt: skip
    assert py.stdin is not None and py.stdout is not None
    try:
        for b in blocks(next(p for p in DOCS if p.name == doc)):
            if b.skip is not None:
                continue
            code = _substitute(b.code, srv)
            where = f"{b.file}:{b.line}"
            # the servers see what the file made so far
            for store in tmp_path.glob("*.zarr"):
                if not (served / store.name).exists():
                    shutil.copytree(store, served / store.name)
            if "s3://" in code:
                _upload(tmp_path, srv.s3)
            if b.lang == "bash":
                proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=900)  # fmt: skip
                assert proc.returncode == 0, f"{where} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            else:
                py.stdin.write(json.dumps({"code": code, "where": where}) + "\n")
                py.stdin.flush()
                reply = json.loads(py.stdout.readline() or '{"ok": false, "error": "interpreter died"}')
                assert reply["ok"], f"{where} failed:\n{code}\n{reply['error']}"
    finally:
        py.stdin.close()
        py.wait(timeout=60)
