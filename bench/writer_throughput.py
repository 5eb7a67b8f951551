"""(i) Store writer throughput: how many CPU cores a GPU machine needs to keep up with its forward passes.

Synthetic batches (no model) of SmolLM2-135M's shapes (30 layers, 9 heads, 3 key-value heads, d_head 64,
d_model 576; ``bench/configs/smollm2-135m``), float16, go through the real store writer
(``StoreWriter.write_batch``: shard encoding, crc32c, LZ4 for ``pattern``, O_DIRECT, fdatasync, the manifest),
as ``extract``'s background writer runs it, with 1 and 2 writer threads (each its own ``StoreWriter``, on
disjoint batches of one store). Bytes are the arrays' raw bytes (what a forward pass hands the writer).
``pattern`` is causal softmax rows (zeros above the diagonal), so LZ4 does the work it does on real patterns;
the other fields are random values.

    python bench/writer_throughput.py [--quick] [--batches 12] [--seq-len 128] [--batch-size 8] [--dir /tmp]

A GPU machine keeps up when ``threads x per-thread tokens/s`` exceeds its forward pass's tokens/s: each writer
thread takes about one core.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from headstore.cli.malloc import restart_tuned
from headstore.extract.plan_config import config_provenance
from headstore.extract.request import ExtractRequest
from headstore.store_schema.arrays import field_dtype, store_layout, store_sizes
from headstore.store_schema.write.create import create_store
from headstore.store_schema.write.writer import StoreWriter

CONFIG = C.ROOT / "bench" / "configs" / "smollm2-135m" / "config.json"
# (label, --fields as ExtractRequest takes them): the default store, and q, k, v without pattern or z (what a
# store whose bytes do not grow with the context keeps)
FIELD_SETS = (("default", ("default",), ()), ("q,k,v (no pattern, no z)", ("default", "q", "k"), ("pattern", "z")))
THREADS = (1, 2)
# a disk (the writer as a job runs it: O_DIRECT, fdatasync) and memory (tmpfs: no disk wait, the writer's CPU cost)
DIRS = [d for d in (tempfile.gettempdir(), "/dev/shm") if Path(d).is_dir()]


def synthetic_batch(shapes: dict[str, tuple[tuple[int, ...], str]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch of every field: causal softmax rows for ``pattern``, random values for the rest."""
    out = {}
    for name, (shape, dtype) in shapes.items():
        if name == "pattern":
            s = shape[-1]
            logits = rng.standard_normal((*shape[:-2], s, s), dtype=np.float32)
            logits[..., np.triu_indices(s, 1)[0], np.triu_indices(s, 1)[1]] = -np.inf
            e = np.exp(logits - logits.max(-1, keepdims=True))
            out[name] = (e / e.sum(-1, keepdims=True)).astype(dtype)
        elif name.endswith("_scale"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(dtype)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return out


def run(fields: tuple[str, ...], drop: tuple[str, ...], threads: int, n_batches: int, seq_len: int, bs: int,
        where: Path) -> dict[str, float]:  # fmt: skip
    """Write ``n_batches`` synthetic batches into a new store with ``threads`` writer threads; wall and CPU seconds."""
    req = ExtractRequest(model=str(CONFIG), dry_run=True, seq_len=seq_len, n_seq=n_batches * bs, batch_size=bs,
                         dtype="float16", fields=fields, drop=drop)  # fmt: skip
    prov = config_provenance(req, CONFIG)
    n = n_batches * bs
    sizes = store_sizes(prov.config, prov, n)
    specs = store_layout(prov, sizes)
    shapes = {f: ((bs, *specs[f].shape[1:]), field_dtype(f, "float16")) for f in prov.fields if f != "tokens"}
    batch = synthetic_batch(shapes, np.random.default_rng(0))
    out = Path(tempfile.mkdtemp(dir=where)) / "w.zarr"
    create_store(out, prov, sizes, np.zeros((n, seq_len), np.int32), {}, {})
    writers = [StoreWriter(out, prov) for _ in range(threads)]
    writers[0].write_batch(0, batch)  # warm-up (the first batch's folders and staging buffers), not timed

    def work(i: int) -> None:
        for b in range(1 + i, n_batches, threads):
            writers[i].write_batch(b * bs, batch)

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out.parent)
    timed = n_batches - 1
    return {"bytes": timed * sum(a.nbytes for a in batch.values()), "tokens": timed * bs * seq_len,
            "wall": wall, "cpu": cpu, "batch_mb": sum(a.nbytes for a in batch.values()) / 1e6}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, default=0, help="batches per run (0: 13, or 5 with --quick)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dir", nargs="+", default=DIRS, help="where the stores are written (then deleted); one row each")
    args = ap.parse_args()
    n_batches = args.batches or (5 if args.quick else 13)
    up_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: list[list[object]] = []
    per_core: dict[str, list[float]] = {}
    for where in args.dir:
        for label, fields, drop in FIELD_SETS:
            for threads in THREADS:
                r = run(fields, drop, threads, n_batches, args.seq_len, args.batch_size, Path(where))
                mbs, tps = r["bytes"] / r["wall"] / 1e6, r["tokens"] / r["wall"]
                rows.append([f"`{where}`", label, threads, f"{r['batch_mb']:.1f}", f"{mbs:.0f}", f"{mbs / threads:.0f}",
                             f"{tps:,.0f}", f"{tps / threads:,.0f}", f"{r['cpu'] / r['wall']:.2f}",
                             f"{r['cpu'] / (r['bytes'] / 1e9):.2f}"])  # fmt: skip
                print(rows[-1], flush=True)
                if threads == 1:  # tokens/s one core writes: tokens / CPU seconds
                    per_core.setdefault(label, []).append(r["tokens"] / r["cpu"])
    up_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    header = ["store on", "fields", "writer threads", "MB per batch", "MB/s", "MB/s per thread", "tokens/s",
              "tokens/s per thread", "CPU cores busy", "CPU s per GB"]  # fmt: skip
    body = (
        f"## (i) Store writer throughput (`bench/writer_throughput.py{' --quick' if args.quick else ''}`)\n\n"
        f"Synthetic SmolLM2-135M batches ({args.batch_size} x {args.seq_len} tokens, float16) through the real "
        f"`StoreWriter` ({n_batches - 1} timed batches per row, after one warm-up; every file fdatasync'ed, "
        "files of 1 MiB or more with O_DIRECT where the file system takes it, not tmpfs). MB are the arrays' raw "
        "bytes. On a disk the rates are the disk's; on tmpfs (`/dev/shm`) they are the writer's own, CPU-bound: "
        "`CPU s per GB` is the cores a GPU machine needs per GB/s its forward passes produce.\n\n"
        f"{C.table(header, rows)}\n\n"
        "One writer thread's core, from its CPU seconds (`tokens / CPU s`, one thread): "
        + "; ".join(f"{k}: {min(v):,.0f}-{max(v):,.0f} tokens/s" for k, v in per_core.items())
        + ". A GPU machine needs its forward passes' tokens/s divided by that many cores for the writer, and a "
        "disk (or several) that takes the MB/s.\n\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `uptime` before: `{up_before}`; after: "
        f"`{up_after}`.\n\nMachine: {C.machine()}.\n"
    )
    print(body)
    C.write_section("writer-throughput", body)


if __name__ == "__main__":
    restart_tuned([__file__, *sys.argv[1:]])  # glibc malloc as `headstore extract` runs the writer (cli/malloc.py)
    main()
