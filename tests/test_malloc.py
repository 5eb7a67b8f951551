"""``headstore extract`` restarts itself once with glibc malloc tuned (cli/malloc.py), and the tuning does what
it says: a process keeps the memory it freed, also what its threads freed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import headstore.cli.malloc as M
from headstore.cli import main
from headstore.store_schema import validate

glibc = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tunables: Linux with glibc only"
)

# RSS before, after touching 240 MB in blocks of 80 MB (main thread) and 8 MB (a second thread), and after freeing
FREE_AND_MEASURE = r"""
import json, threading
import numpy as np
def rss():
    return int([ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")][0].split()[1]) // 1024
before = rss()
big = [np.ones(10_000_000) for _ in range(2)]  # 80 MB each: mapped on their own by default
small = []
t = threading.Thread(target=lambda: small.extend(np.ones(1_000_000) for _ in range(10)))  # 8 MB each, a thread heap
t.start(); t.join()
held = rss()
del big, small
print(json.dumps({"before": before, "held": held, "after": rss()}))
"""


def _rss(env: dict[str, str]) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc
def test_tuned_process_keeps_what_it_freed() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", M.DONE, "MALLOC_ARENA_MAX")}
    plain, tuned = _rss(env), _rss(M.tuned_env(env))
    for r in (plain, tuned):
        assert r["held"] - r["before"] >= 220, r  # all 240 MB (229 MiB) were touched
    assert plain["after"] - plain["before"] < 60, plain  # glibc's defaults hand them back
    assert tuned["after"] - tuned["before"] >= 220, tuned  # tuned: kept for the next batch


def _restart_args(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]) -> list[object] | None:
    """What main() passes to os.execve for ``argv`` under ``env`` (None: it did not restart)."""
    calls: list[object] = []

    class Restarted(Exception):
        pass

    def fake_execve(path: str, args: list[str], new_env: dict[str, str]) -> None:
        calls.extend([path, args, new_env])
        raise Restarted

    monkeypatch.setattr(M.os, "execve", fake_execve)
    monkeypatch.setattr(M.os, "environ", env)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
    except Restarted:
        return calls
    except SystemExit:
        pass
    return None


@glibc
def test_extract_restarts_once_with_the_tunables(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"PATH": os.environ.get("PATH", ""), "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    got = _restart_args(monkeypatch, ["headstore", "extract", "--help"], dict(base))
    assert got is not None
    path, args, env = got
    assert path == sys.executable and args == [sys.executable, "-m", "headstore.cli", "extract", "--help"]
    assert isinstance(env, dict) and env[M.DONE] == "1" and env["PATH"] == base["PATH"]
    assert env["GLIBC_TUNABLES"] == f"{M.TUNABLES}:glibc.malloc.tcache_count=0"  # the caller's come last: they win
    # once restarted, opted out, or another command: no restart
    assert _restart_args(monkeypatch, ["headstore", "extract", "--help"], {**base, M.DONE: "1"}) is None
    assert _restart_args(monkeypatch, ["headstore", "extract", "--help"], {**base, M.OPT_OUT: "0"}) is None
    assert _restart_args(monkeypatch, ["headstore", "info", "--help"], dict(base)) is None


@glibc
def test_extract_command_runs_restarted(tmp_path: Path) -> None:
    """The real command in its own process: it starts again once, tuned, then extracts a valid store."""
    out = tmp_path / "s.zarr"
    starts = tmp_path / "starts.jsonl"
    site = tmp_path / "site"
    site.mkdir()  # every interpreter start records what it was given
    (site / "sitecustomize.py").write_text(
        "import json, os\n"
        f"with open({str(starts)!r}, 'a') as f:\n"
        f"    f.write(json.dumps([os.environ.get({M.DONE!r}), os.environ.get('GLIBC_TUNABLES')]) + '\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (M.DONE, "GLIBC_TUNABLES")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "headstore.cli", "extract", "--model", "tiny-gpt2", "--data", "ioi", "--n-seq", "8",
           "--batch-size", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(ln) for ln in starts.read_text().splitlines()] == [[None, None], ["1", M.TUNABLES]]
    assert validate(out).ok
