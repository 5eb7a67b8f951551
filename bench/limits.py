"""(l) Every analyzer against its own limit: this machine's page-cache read bandwidth, float32 GEMM rate and exp
rate; for each registered analyzer on a store, the bytes it must read and the FLOPs and exps it must do, and
measured time / limit. Also the store's fields read through both codec pipelines, side by side.

    python bench/limits.py [--quick]                 # a tiny-gpt2 IOI store (seconds)
    python bench/limits.py --model smollm2-135m --n-seq 8 --data text --seq-len 128   # the real use

The limit of an analyzer is max(bytes / read bandwidth, FLOPs / GEMM rate, exps / exp rate): what it could
not beat on this machine even with perfect overlap. FLOPs and exps are modelled for the analyzers whose
arithmetic is large (copy-suppression, projection-loss, attention-stats, head-scores); the others are counted
by their reads only (their limit is then a lower bound and "read" their bound).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CORES = len(os.sched_getaffinity(0))
PIPE_HEADER = ["field", "MB", "zarr-python GB/s", "zarrs GB/s", "wall speed-up", "CPU ratio", "direct zarr-python GB/s",
               "direct zarrs GB/s"]  # fmt: skip


def read_bandwidth(folder: Path) -> float:
    """Bytes/s reading every file of ``folder`` from the page cache (a first pass warms it), into one buffer."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = max(p.stat().st_size for p in files)
    buf = bytearray(size)

    def read_all() -> int:
        n = 0
        for p in files:
            with open(p, "rb", buffering=0) as f:
                n += f.readinto(buf) or 0
        return n

    total = read_all()
    return total / C.timeit(read_all, repeat=3, warmup=0, stat=min)


def gemm_rate(n: int = 1024) -> float:
    """float32 FLOP/s of an n x n x n matmul (BLAS on every core it uses)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / C.timeit(lambda: a @ a, repeat=5, stat=min)


def exp_rate(n: int = 1 << 22) -> float:
    """float32 exp/s over ``CORES`` threads (numpy's ufuncs release the GIL)."""
    parts = [np.random.default_rng(i).standard_normal(n // CORES, dtype=np.float32) for i in range(CORES)]
    outs = [np.empty_like(p) for p in parts]
    with ThreadPoolExecutor(CORES) as pool:

        def run() -> None:
            list(pool.map(lambda i: np.exp(parts[i], out=outs[i]), range(CORES)))

        return n / C.timeit(run, repeat=5, stat=min)


def sizes(ds: Any) -> dict[str, int]:
    s = dict(ds.sizes)
    return {
        "B": s["batch"], "L": s["layer"], "H": s["head"], "P": s.get("pos", s.get("query_pos", 1)),
        "D": s.get("d_head", 1), "M": s.get("d_model", 1), "V": s.get("d_vocab", 1),
    }  # fmt: skip


def cost(name: str, z: dict[str, int]) -> tuple[float, float]:
    """(FLOPs, exps) an analyzer must do on a store of these sizes (0, 0: not modelled)."""
    B, L, H, P, D, M, V = (z[k] for k in "BLHPDMV")
    pat = B * L * H * P * P  # pattern elements
    if name == "copy-suppression":  # W_O @ W_U[:, tokens] (l h d) x (b k), then coef, mask, weighted sums
        return 2 * L * H * D * M * B * P + 2 * B * L * H * P * D + 4 * pat, 0.0
    if name == "projection-loss":  # z @ (W_O @ W_U) per head and token, three log-softmaxes over the vocabulary
        return 2 * B * P * L * H * D * V + 2 * L * H * D * M * V, 3.0 * B * P * L * H * V
    if name == "attention-stats":  # entropy (a log per element), distance, top-1
        return 5.0 * pat, float(pat)
    if name == "head-scores":
        return 3.0 * pat, 0.0
    return 0.0, 0.0


def read_bytes(ds: Any, requires: tuple[str, ...]) -> int:
    """Bytes of the stored arrays an analyzer reads (its declared fields present in the store, stored dtype)."""
    return int(sum(ds[n].nbytes for n in requires if n in ds.variables))


def runnable(spec: Any) -> str:
    """'' when the analyzer runs on one store with its defaults, else why not."""
    if spec.n_stores != 1:
        return "needs two stores"
    sig = inspect.signature(spec.func)
    req = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    return f"needs {', '.join(req)}" if req else ""


def analyzer_rows(path: Path, rates: dict[str, float], repeat: int, skip: set[str]) -> list[list[Any]]:
    from headstore import open_store
    from headstore.cli.registry import analyzers

    ds = open_store(path)
    z = sizes(ds)
    rows = []
    for name, spec in analyzers().items():
        missing = [r for r in spec.requires if r not in ds.variables]
        why = "skipped (--skip)" if name in skip else runnable(spec)
        why = why or (f"store lacks {', '.join(missing)}" if missing else "")
        if why:
            rows.append([name, "-", "-", "-", "-", "-", "-", f"not run: {why}"])
            continue
        nbytes = read_bytes(ds, spec.requires)
        flops, exps = cost(name, z)
        parts = {"read": nbytes / rates["read"], "FLOPs": flops / rates["gemm"], "exps": exps / rates["exp"]}
        bound = max(parts, key=lambda k: parts[k])
        limit = parts[bound]
        try:
            t = C.timeit(lambda spec=spec: spec.func(open_store(path)).compute(), repeat=repeat, warmup=1)
        except Exception as e:  # an analyzer that needs what this store lacks (IOI columns, a split)
            rows.append([name, "-", "-", "-", "-", "-", "-", f"not run: {type(e).__name__}: {str(e)[:60]}"])
            continue
        rows.append([name, nbytes / 1e6, flops / 1e9, exps / 1e6, limit, t, limit / t, bound])
    return rows


def pipeline_rows(path: Path, repeat: int) -> list[list[Any]]:
    """Each bulk field read whole through open_store with zarrs (auto) and zarr-python, interleaved."""
    import zarr

    from headstore import open_store
    from headstore.store_schema.read.codec_pipeline import prefer, zarrs_twin

    opened = {}
    for choice in ("auto", "zarr"):
        with prefer(choice):  # type: ignore[arg-type]
            opened[choice] = open_store(path)
    rows = []
    for name in ("pattern", "z", "v", "resid_final"):
        plain = zarr.open_array(str(path), path=name, mode="r")
        twin = zarrs_twin(plain)
        reads = {"auto": lambda n=name: opened["auto"][n].values, "zarr": lambda n=name: opened["zarr"][n].values,
                 "direct zarrs": lambda a=twin: a[...], "direct zarr": lambda a=plain: a[...]}  # fmt: skip
        got: dict[str, list[float]] = {k: [] for k in reads}
        cpu: dict[str, list[float]] = {k: [] for k in reads}
        for _ in range(repeat + 1):  # the first round warms the page cache
            for key, fn in reads.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                got[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
        nb = plain.nbytes
        w = {k: min(v[1:]) for k, v in got.items()}
        c = {k: min(v[1:]) for k, v in cpu.items()}
        rows.append([name, nb / 1e6, nb / w["zarr"] / 1e9, nb / w["auto"] / 1e9, w["zarr"] / w["auto"],
                     c["zarr"] / c["auto"], nb / w["direct zarr"] / 1e9, nb / w["direct zarrs"] / 1e9])  # fmt: skip
    return rows


def report(args: argparse.Namespace, path: Path, rates: dict[str, float], rows: list, prows: list) -> str:
    cmd = "python bench/limits.py" + (" --quick" if args.quick else f" --model {args.model} --data {args.data} "
                                      f"--n-seq {args.n_seq} --seq-len {args.seq_len}")  # fmt: skip
    cmd += f" --skip {args.skip}" if args.skip else ""
    cmd += f" --rounds {args.rounds}" if args.rounds else ""
    return f"""## (l) Every analyzer against its own limit

Command: `{cmd}` — machine: {C.machine()}.
Store: `{path.name}` (sharded, float32). **These figures came from a loaded box** (load average printed above,
{CORES} usable cores shared with other jobs): absolute times and rates are inflated or deflated by the other
jobs, and the ratios below are side by side in one run; rerun on an idle box before reading them as the
machine's.

Machine limits, measured in the same run: page-cache read {rates["read"] / 1e9:.2f} GB/s (every file of the
store into one buffer, after a warm-up pass; the disk itself was not measured: the page cache cannot be
dropped here), float32 GEMM {rates["gemm"] / 1e9:.1f} GFLOP/s (1024^3 matmul), exp {rates["exp"] / 1e6:.0f} M/s
({CORES} threads).

{C.table(["analyzer", "reads MB", "GFLOP", "M exps", "limit s", "measured s", "limit / measured", "bound"], rows)}

"limit" = max(reads / read rate, FLOPs / GEMM rate, exps / exp rate), "bound" the largest of the three.
FLOPs and exps are modelled only for copy-suppression, projection-loss, attention-stats and head-scores;
for the others the limit counts reads only (a lower bound). Reads are the stored bytes of the fields the
analyzer declares (the registry's `requires`), whole.

Whole fields read through `open_store` (warm page cache), zarrs' pipeline (whole shards) vs zarr-python's,
interleaved, fastest of the rounds after a warm-up round; "CPU ratio" = process CPU seconds (every thread) zarr-python / zarrs:

{C.table(PIPE_HEADER, prows)}

"direct": the zarr array read whole with `arr[...]`, without `open_store` or dask; the other columns time
`open_store(path)[field].values` (opened once before the rounds: dask reads the store again on each).
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tiny-gpt2 IOI store, one round")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="text")
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per pipeline read (default 6, quick 2)")
    ap.add_argument("--skip", default="", help="analyzers not run, comma-separated (e.g. projection-loss)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.quick:
        path = C.store("tiny-gpt2", "ioi", 16, 8, fields="default,k,resid_pre")
    else:
        path = C.store(args.model, args.data, args.n_seq, args.n_seq, seq_len=args.seq_len)
    repeat = 1 if args.quick else 2
    rates = {"read": read_bandwidth(path), "gemm": gemm_rate(), "exp": exp_rate()}
    rows = analyzer_rows(path, rates, repeat, set(filter(None, args.skip.split(","))))
    prows = pipeline_rows(path, args.rounds or (2 if args.quick else 6))
    body = report(args, path, rates, rows, prows)
    print(body)
    if not args.no_write:
        C.write_section("limits" + ("_quick" if args.quick else ""), body)


if __name__ == "__main__":
    main()
