"""(h) ``open_store`` over HTTP of a store with a shared weights store: seconds and bytes transferred, this code
against an older checkout (``--old``), each open in a fresh process, the same server (``headstore serve``'s).

    python bench/remote_open.py [--quick] [--old /path/to/old/checkout] [--folder DIR]

``--folder``: a folder holding ``ioi.zarr`` made with ``--weights`` pointing into it (``weights.zarr``), e.g.
``headstore extract --model smollm2-135m --data ioi --n-seq 4 --weights DIR/weights.zarr --out DIR/ioi.zarr``;
without it the bench extracts that pair into its cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

CLIENT = """
import json, sys, time
t0 = time.perf_counter()
from headstore import open_store
t1 = time.perf_counter()
ds = open_store(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"open_s": t2 - t1, "import_s": t1 - t0, "n_vars": len(ds.data_vars), "file": __import__("headstore").__file__}))
"""


def pair(folder: Path | None, model: str) -> Path:
    """A folder with ``ioi.zarr`` taking its weights from ``weights.zarr`` beside it (extracted if absent)."""
    if folder is not None:
        return folder
    folder = C.CACHE / f"remote-open-{model}"
    if not (folder / "ioi.zarr").exists():
        from headstore.extract import ExtractRequest, extract

        extract(ExtractRequest(model=model, data="ioi", out=str(folder / "ioi.zarr"), n_seq=4, batch_size=4,
                               weights=str(folder / "weights.zarr"), device="cpu", progress=False))  # fmt: skip
    return folder


def serve(folder: Path) -> tuple[Any, dict[str, int], list[str]]:
    """``headstore serve``'s server over ``folder``, counting the body bytes it sends per top-level folder."""
    from headstore.cli.serve import make_server

    server = make_server(str(folder), port=0, quiet=True)
    sent: dict[str, int] = {}
    requests: list[str] = []
    base = server.RequestHandlerClass

    class Counting(base):  # type: ignore[misc, valid-type]
        def copyfile(self, source: Any, outputfile: Any) -> None:
            top = self.path.lstrip("/").split("/")[0]
            requests.append(self.path)

            class Out:
                def write(self, b: bytes) -> int:
                    sent[top] = sent.get(top, 0) + len(b)
                    return int(outputfile.write(b))

            super().copyfile(source, Out())

    server.RequestHandlerClass = Counting
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, sent, requests


def one_open(code: Path, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, url], env=env, cwd=code, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(code.resolve()), (got["file"], code)
    return got


def measure(code: Path, url: str, sent: dict[str, int], requests: list[str], repeat: int) -> dict[str, Any]:
    """Median open seconds over ``repeat`` fresh processes; bytes and requests of the last one."""
    times = []
    for _ in range(repeat):
        sent.clear()
        requests.clear()
        times.append(one_open(code, url)["open_s"])
    return {"open_s": statistics.median(times), "bytes": dict(sent), "requests": len(requests)}


def commit(code: Path) -> str:
    """The checkout's commit (``+`` when its tracked files have changes)."""
    git = ["git", "-C", str(code)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "headstore"]).returncode != 0
    return f"{head or '?'}{'+' if dirty else ''}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--old", type=Path, default=None, help="a checkout of the code to compare against")
    args = ap.parse_args()
    repeat = 1 if args.quick else 3
    folder = pair(args.folder, args.model)
    w_bytes = sum(p.stat().st_size for p in (folder / "weights.zarr").rglob("*") if p.is_file())
    s_bytes = sum(p.stat().st_size for p in (folder / "ioi.zarr").rglob("*") if p.is_file())
    server, sent, requests = serve(folder)
    url = f"http://127.0.0.1:{server.server_address[1]}/ioi.zarr"
    codes = [(f"before ({commit(args.old)})", args.old)] if args.old else []
    codes.append((f"after ({commit(C.ROOT)}, this checkout)", C.ROOT))
    rows, results = [], []
    try:
        for label, code in codes:
            r = measure(code, url, sent, requests, repeat)
            results.append(r)
            wb, sb = r["bytes"].get("weights.zarr", 0), r["bytes"].get("ioi.zarr", 0)
            print(f"{label}: open {r['open_s']:.2f} s, {r['requests']} requests, weights store {wb} B "
                  f"({100 * wb / w_bytes:.3g} % of {w_bytes}), store {sb} B")  # fmt: skip
            rows.append([label, r["open_s"], r["requests"], f"{wb / 2**20:.4g}", f"{100 * wb / w_bytes:.3g} %", sb])
        for label, code in codes:  # the same open from the local folder: the weights check costs the same there
            local = statistics.median(one_open(code, str(folder / "ioi.zarr"))["open_s"] for _ in range(repeat))
            print(f"{label}, local folder: open {local:.2f} s")
            rows.append([f"{label}, local folder", local, "-", "-", "-", "-"])
    finally:
        server.shutdown()
        server.server_close()
    ratio = ""
    if len(results) == 2:
        t = results[0]["open_s"] / results[1]["open_s"]
        b = sum(results[0]["bytes"].values()) / max(1, sum(results[1]["bytes"].values()))
        ratio = f"\nAfter vs before: {t:.1f}x faster, {b:.0f}x fewer bytes.\n"
    cmd = "python bench/remote_open.py" + (" --quick" if args.quick else "") + (" --old OLD" if args.old else "")
    body = f"""## (h) Opening a store over HTTP: metadata only

Command: `{cmd}` on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} — machine: {C.machine()}.
`open_store("http://127.0.0.1:PORT/ioi.zarr")` of a `{args.model}` IOI store ({s_bytes / 2**20:.1f} MiB on disk)
that takes W_E, W_EE, W_U, b_U and vocab from a shared weights store ({w_bytes / 2**20:.1f} MiB), served on
localhost by `headstore serve`'s server. Each open runs in a fresh process (import time excluded; median of
{repeat}); bytes are the response bodies the server sent during the open. Before: the weights store's sha256
recomputed over every array on open. After: its identity checked from metadata (the hash it records about
itself, its manifest, shapes, dtypes); each chunk's crc32c is checked when read, and `validate` hashes it all.

{C.table(["code (HTTP unless said)", "open (s)", "requests", "weights store MiB sent", "of the weights store", "store bytes"], rows)}
{ratio}
Before, the hash read each array in 16 MB row blocks, and over HTTP each block fetched the array's whole
shard again (W_E, W_EE, W_U are one chunk each), hence more bytes than the weights store holds. After,
the weights store costs one request (its root `zarr.json`); the store's own bytes are its `zarr.json`,
the manifest and the two-byte range check.
"""
    C.write_section("remote-open", body)


if __name__ == "__main__":
    main()
