"""(l) Every analyzer against its own limit: this machine's page-cache read bandwidth, float32 GEMM rate and exp
rate; for each registered analyzer, on the store it runs on, the bytes it must read and the FLOPs and exps it must
do, measured time / limit, a profile split of one synchronous run (read/decode wait, dask concatenate, astype
copies, the analyzer's kernel, dask, other), and threaded vs synchronous scheduling side by side. Also the store's
fields read through both codec pipelines, side by side (where ``codec_pipeline`` is there).

    python bench/limits.py [--quick]          # tiny-gpt2 stores (seconds)
    python bench/limits.py                    # SmolLM2-135M: a text store of 8 x 128 tokens, IOI / ABC stores of 16
    python bench/limits.py --skip projection-loss,calibration,circuits    # leave the slow ones out

The limit of an analyzer is max(bytes / read rate, FLOPs / GEMM rate, exps / exp rate): what it could not beat on
this machine even with perfect overlap (every FLOP at the GEMM rate, elementwise passes included). ``cost`` models
each analyzer's dominant arithmetic from its module's formula; reads are the stored bytes on disk of the fields it
reads (a derived field costs its inputs' bytes), the layers it touches only.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CORES = len(os.sched_getaffinity(0))
METRIC = "logit-diff:io_token,s_token@end_pos"
PIPE_HEADER = ["field", "MB", "zarr-python GB/s", "zarrs GB/s", "wall speed-up", "CPU ratio", "direct zarr-python GB/s",
               "direct zarrs GB/s"]  # fmt: skip
CATS = ("read", "concat", "astype", "kernel", "dask", "other")
HEADER = ["analyzer", "store", "reads MB", "GFLOP", "M exps", "limit s", "measured s", "limit / measured", "bound",
          *(f"{c.replace('dask', 'dask+xarray')} %" for c in CATS), "tasks", "hottest (sync profile)", "what holds it back"]  # fmt: skip
LAST = ("calibration", "circuits", "projection-loss")  # minutes each on SmolLM2
SLOW_S = 20.0  # an analyzer whose profiled run took longer is timed once


# --- this machine's rates ----------------------------------------------------------------------------------------


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


# --- what each analyzer must read and compute --------------------------------------------------------------------


def sizes(ds: Any) -> dict[str, int]:
    """B batch, L layers, H heads, K kv heads, P positions, D d_head, M d_model, V d_vocab, E causal (q, k) entries
    of the real tokens (``length`` column where there is one)."""
    s = dict(ds.sizes)
    z = {
        "B": s["batch"], "L": s["layer"], "H": s["head"], "K": s.get("kv_head", s["head"]),
        "P": s.get("pos", s.get("query_pos", 1)), "D": s.get("d_head", 1), "M": s.get("d_model", 1),
        "V": s.get("d_vocab", 1),
    }  # fmt: skip
    n = np.asarray(ds["length"].values) if "length" in ds else np.full(z["B"], z["P"])
    z["E"] = int((n * (n + 1) // 2).sum())
    z["T"] = int(n.sum())  # real tokens
    return z


def cost(name: str, z: dict[str, int], params: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs, exps) an analyzer must do on a store of sizes ``z`` (``sizes``) with ``params``: the dominant
    products of its module's formula (2 m n k per GEMM), elementwise passes over large arrays as one FLOP per
    element and pass, and one exp (or log) per element of a softmax, log-softmax or entropy."""
    B, L, H, K, P, D, M, V, E, T = (z[k] for k in "BLHKPDMVET")
    pat = B * L * H * P * P  # pattern elements (stored, padded)
    f: float
    x: float = 0.0
    if name == "attention-attribution":  # components' queries and keys through W_Q / W_K, their pairwise terms
        L0 = params["head"][0]
        n_c = 1 + L0 * (H + 2)  # embed, every earlier head, b_O and MLP per earlier layer
        f = B * (2 * 2 * n_c * M * D + 2 * n_c * n_c * D + 4 * n_c * M) + 2 * B * 2 * L0 * H * D * M
    elif name == "attention-search":  # mask x pattern, summed
        f = 2.0 * pat
    elif name == "attention-stats":  # entropy (a log per element), distance, top-1
        f, x = 5.0 * pat, float(pat)
    elif name == "attribution-patching":  # (z_corrupt - z_clean) . grad_z
        f = 3.0 * B * L * P * H * D
    elif name == "calibration":  # baseline logits, then per head: its unembedded output, softmax, top-k, bins
        n_h = L * H if params.get("heads", "all") == "all" else len(params["heads"])
        t = B * (P - 1)
        unembed = 2 * min(t * M * (D + V), D * V * (M + t))
        f = 2 * t * M * V + 6 * t * V + n_h * (unembed + 6 * t * V)
        x = (n_h + 1) * t * V
    elif name == "circuits":  # ln1(E) @ W_V per kv head; per head x_v @ G (d_head^2), two matvecs over (V, M)
        f = 2 * L * K * V * M * D + L * H * (2 * V * D * D + 4 * V * D + 2 * 2 * V * M) + 20 * V * M
    elif name == "composition":  # per kind: every earlier head's P (D x M) @ every later head's S (M x D)
        n_k = len(params.get("kinds", "QKV"))
        pairs = 2 * M * (H * D) ** 2 * L * (L - 1) / 2
        factors = 4 * L * H * M * D * D  # Gram matrices and R @ B, float64
        draws = params.get("n_draws", 100) * (4 * 2 * M * D * D + 2 * D * M * D)
        f = factors + n_k * (pairs + factors + draws)
    elif name == "copy-suppression":  # W_O @ W_U[:, tokens] (l h d) x (b k), then coef, mask, weighted sums
        f = 2 * L * H * D * M * B * P + 2 * B * L * H * P * D + 4 * pat
    elif name == "edge-attribution":  # per sequence: senders (S, P M) @ receivers (R, P M)^T, lower triangle
        S, R = 1 + L * (H + 1), L * (H + 2 * K + 1) + 1
        f = B * (S * R * P * M * (1 + 1 / 8) + 2 * L * P * (2 * H + 2 * K) * D * M + 10 * R * P * M)
    elif name == "head-scores":  # (heads, n n) @ (n n, 1 + kinds) per sequence, and the detection patterns
        n_kinds = len(params.get("kinds", range(5)))
        f = 2.0 * B * L * H * E * (1 + n_kinds) + 2.0 * pat
    elif name == "head-similarity":  # G = X X^T over the causal entries, every pair of heads
        f = 2.0 * (L * H) ** 2 * E + 2.0 * L * H * E
    elif name == "ifelse-detector":  # contributions at the last position, then 3 Ledoit-Wolf fits (eigh ~ 9 F^3)
        mt = params.get("max_tokens", 16)
        f = 2 * L * H * D * M + 2 * B * L * H * P * D + 4 * B * L * H * P
        f += sum(2 * B * F * F + 9 * F**3 for F in (L * H, L * H * (mt + 1), M))
    elif name in ("ioi", "ioi-pair"):  # logit difference at the end token, attention differences
        f = (2 if name == "ioi-pair" else 1) * (B * 7 * M + 2 * B * L * H)
    elif name == "logit-attribution":  # W_O @ u per sequence, v . that, pattern row, per-head result at dest
        f = 2 * B * L * H * D * M * 2 + 2 * B * L * H * P * D + 2 * B * L * H * P
    elif name == "path-patch-query":  # senders' deltas at the end token, ln1, q, one score row, its softmax
        n_s = params["receiver"][0] * H if params.get("senders", "all") == "all" else len(params["senders"])
        f, x = B * (2 * n_s * M + 5 * M + 2 * M * D + 2 * P * D), float(B * P)
    elif name == "projection-loss":  # per head: a @ (u @ W_U), z @ W_O @ W_U, three log-softmaxes over d_vocab
        t, n_h = B * P, L * H
        unembed = 2 * min(t * M * (D + V), D * V * (M + t))
        f = 2 * t * M * V * 2 + n_h * (2 * t * D * M + 2 * B * P * P * V + unembed + 18 * t * V)
        x = (3 * n_h + 1) * t * V
    elif name == "top-attention":  # mask, compare, partition
        f = 3.0 * pat
    elif name == "top-effects":  # by next: (z @ W_O) . u(next token) per (b, q, head), top-k
        f = 2 * T * L * H * D * M + 2 * T * L * H * M
    else:
        raise KeyError(f"no cost model for analyzer {name!r}: add one to bench/limits.py")
    return float(f), float(x)


def field_bytes(path: Path, name: str, ds: Any) -> tuple[int, bool]:
    """(bytes on disk of ``name``, whether it has a layer axis); a derived field costs its inputs."""
    folder = path / name
    if folder.is_dir():
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), "layer" in ds[name].dims
    inputs = {"pattern": ("q", "k"), "z": ("pattern", "v"), "result": ("z",)}.get(name, ())
    got = [field_bytes(path, n, ds) for n in inputs if n in ds.variables]
    return sum(g[0] for g in got), True


# the fields each analyzer reads from the second (corrupt / ABC) store
SECOND_READS = {
    "attribution-patching": ("z",),
    "edge-attribution": ("z", "resid_pre", "resid_final"),
    "ioi-pair": ("pattern", "resid_final", "ln_final_scale", "W_U", "b_U"),
    "path-patch-query": ("result",),
}


def layers_read(name: str, field_name: str, n_layers: int, params: dict[str, Any]) -> int:
    """How many layers of a layered field an analyzer reads (inner chunks hold one layer each)."""
    if name == "attention-attribution":
        L0 = params["head"][0]
        return {"resid_pre": L0 + 1, "ln1_scale": 1, "z": L0, "result": L0, "W_Q": 1, "W_K": 1, "b_Q": 1,
                "b_K": 1, "pattern": 1}.get(field_name, n_layers)  # fmt: skip
    if name == "path-patch-query":
        Lr = params["receiver"][0]
        return {"resid_pre": 1, "k": 1, "W_Q": 1, "b_Q": 1, "ln1_scale": 1, "result": Lr}.get(field_name, n_layers)
    return n_layers


def read_bytes(name: str, spec: Any, paths: list[Path], datasets: list[Any], params: dict[str, Any]) -> int:
    """Bytes on disk of what the analyzer reads: its declared fields, in each store it reads them from."""
    total = 0
    for i, (path, ds) in enumerate(zip(paths, datasets, strict=True)):
        names = spec.requires if i == 0 else SECOND_READS.get(name, ())
        for n in names:
            if n not in ds.variables:
                continue
            nbytes, layered = field_bytes(path, n, ds)
            if layered and "layer" in ds.sizes:
                nbytes = nbytes * layers_read(name, n, ds.sizes["layer"], params) // ds.sizes["layer"]
            total += nbytes
    return total


# --- where the time goes: one synchronous run under cProfile ----------------------------------------------------

_STDLIB = os.path.dirname(os.__file__).replace("\\", "/")
_NUMERIC = re.compile(r"/(numpy|scipy|sklearn|opt_einsum|einops|threadpoolctl)/")


def _own(key: tuple[str, int, str]) -> str | None:
    """The category of a function's own time; None where it goes to its callers (numpy, builtins, the standard
    library), "xarray" for xarray's own Python, "import" for module imports (left out of the split)."""
    file, _, func = key
    file = file.replace("\\", "/")
    if file == "~":
        if "acquire" in func and "lock" in func:  # the sync scheduler waiting on zarr's event-loop thread
            return "read"
        if "astype" in func or "ascontiguousarray" in func:
            return "astype"
        return None
    if "importlib" in file:
        return "import"
    if re.search(r"/(zarr|zarrs|numcodecs|crc32c|fsspec|asyncio|concurrent)/", file) or "store_schema/read" in file:
        return "read"
    if "/dask/" in file:
        if "rechunk" in file or func in ("concatenate3", "_concatenate2", "concatenate", "concatenate_lookup"):
            return "concat"
        if func == "astype" or (file.endswith("dask/array/chunk.py") and "astype" in func):
            return "astype"
        return "dask"
    if "/xarray/" in file:
        return "xarray"
    if "headstore/analyze/" in file:
        return "kernel"
    if _NUMERIC.search(file) or file.startswith(_STDLIB) or file.startswith("<frozen"):
        return None
    return "other"


def _numeric(key: tuple[str, int, str]) -> bool:
    return bool(_NUMERIC.search(key[0].replace("\\", "/"))) or (key[0] == "~" and "numpy" in key[2])


def profile_split(stats: pstats.Stats) -> tuple[dict[str, float], float, str]:
    """(category -> seconds of own time, total, hottest function). The own time of numpy, builtins and the
    standard library goes to their callers, up to the first frame of a known category; numpy called by dask
    (a task's own compute) or by xarray on behalf of the analyzer is the kernel; xarray's and dask's own Python is
    "dask" (graph building, scheduling, bookkeeping); imports are left out."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    memo: dict[tuple[Any, bool], dict[str, float]] = {}

    def context(key: Any, numeric: bool, depth: int, seen: frozenset[Any]) -> dict[str, float]:
        """Category weights of the work ``key`` does on behalf of its caller chain."""
        own = _own(key)
        if own == "dask" and numeric:
            return {"kernel": 1.0}
        if own == "xarray" and not numeric:
            return {"dask": 1.0}
        if own not in (None, "xarray"):
            return {str(own): 1.0}
        if depth > 12 or key in seen:
            return {"other": 1.0}
        if (key, numeric) in memo:
            return memo[key, numeric]
        numeric = numeric or _numeric(key)
        callers = raw[key][4] if key in raw else {}
        total = sum(v[3] for v in callers.values())
        weights: dict[str, float] = {}
        for ck, v in callers.items():
            share = v[3] / total if total else 1 / len(callers)
            for cat, w in context(ck, numeric, depth + 1, seen | {key}).items():
                weights[cat] = weights.get(cat, 0.0) + share * w
        memo[key, numeric] = weights or {"other": 1.0}
        return memo[key, numeric]

    out = dict.fromkeys(CATS, 0.0)
    hot: dict[str, float] = {}
    for key, (_, _, tt, _, callers) in raw.items():
        own = _own(key)
        if own == "import":
            continue
        if own == "xarray":
            own = "dask"
        if own is not None:
            out[own] += tt
        else:  # split by caller (each caller's share of this function's own time)
            tot = sum(v[2] for v in callers.values())
            for ck, v in callers.items():
                for cat, w in context(ck, _numeric(key), 1, frozenset({key})).items():
                    if cat != "import":
                        out[cat] += tt * (v[2] / tot if tot else 1 / len(callers)) * w
            if not callers:
                out["other"] += tt
        label = f"{Path(key[0]).name}:{key[2]}"
        if key[0] == "~":  # a builtin: name its main caller too
            by = max(callers, key=lambda ck: callers[ck][2]) if callers else None
            label = key[2].replace("<built-in method ", "<") + (f" in {Path(by[0]).name}:{by[2]}" if by else "")
        hot[label] = hot.get(label, 0.0) + tt
    total = sum(out.values()) or 1.0
    top = max(hot, key=lambda k: hot[k]) if hot else "-"
    return out, total, f"{top[:90]} {100 * hot.get(top, 0.0) / total:.0f}%"


# --- what runs where ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    stores: tuple[str, ...]  # keys of the stores dict, in the analyzer's argument order
    params: Callable[[dict[str, int], Any], dict[str, Any]] = field(default=lambda z, ds: {})


def _head(z: dict[str, int]) -> tuple[int, int]:
    return min(10, z["L"] - 1), min(7, z["H"] - 1)


def _runs() -> dict[str, Run]:
    from headstore.analyze import Relation

    text, ioi = ("text",), ("ioi",)
    return {
        "attention-attribution": Run(ioi, lambda z, ds: {"head": _head(z)}),
        "attention-search": Run(text, lambda z, ds: {"query": Relation.ANY, "key": Relation.PREVIOUS}),
        "attention-stats": Run(text),
        "attribution-patching": Run(("grad", "abc")),
        "calibration": Run(text),
        "circuits": Run(text),
        "composition": Run(text),
        "copy-suppression": Run(text),
        "edge-attribution": Run(("grad", "abc")),
        "head-scores": Run(text),
        "head-similarity": Run(text),
        "ifelse-detector": Run(("ifelse",)),
        "ioi": Run(ioi),
        "ioi-pair": Run(("ioi", "abc")),
        "logit-attribution": Run(text, lambda z, ds: {"target": ds["io_token"]} if "io_token" in ds else {}),
        "path-patch-query": Run(("ioi", "abc"), lambda z, ds: {"senders": "all", "receiver": _head(z)}),
        "projection-loss": Run(text),
        "top-attention": Run(text),
        "top-effects": Run(text),
    }


def stores(args: argparse.Namespace) -> dict[str, Path]:
    """The stores the analyzers run on (extracted on first use, cached under the bench cache)."""
    if args.quick:
        m, n = "tiny-gpt2", 8
        ioi = C.store(m, "ioi", n, 8, fields=("default", "k", "resid_pre"))
        text = ioi
    else:
        m, n = args.model, args.n_ioi
        ioi = C.store(m, "ioi", n, 8, fields=("default", "k", "resid_pre"))
        text = C.store(m, args.data, args.n_seq, args.n_seq, seq_len=args.seq_len)
    return {
        "text": text, "ioi": ioi,
        "grad": C.store(m, "ioi", n, 8, grad=METRIC),
        "abc": C.store(m, "ioi-abc", n, 8, fields=("default", "resid_pre")),
        "ifelse": C.store(m, "code-ifelse", 24, 8),
    }  # fmt: skip


def _tasks(res: Any) -> int:
    graph = res.__dask_graph__() if hasattr(res, "__dask_graph__") else None
    return len(graph) if graph is not None else 0


def held_back(ratio: float, bound: str, split: dict[str, float], total: float, flops: float, rates: dict[str, float],
              n_tasks: int) -> str:  # fmt: skip
    """One phrase from the profile split: what keeps the analyzer from its limit."""
    if ratio >= 0.5:
        return f"at {ratio:.2f} of its {bound} limit"
    cat = max(split, key=lambda k: split[k])
    pct = 100 * split[cat] / total
    if cat == "read":
        return f"read/decode wait ({pct:.0f}%)"
    if cat == "concat":
        return f"dask concatenate ({pct:.0f}%)"
    if cat == "astype":
        return f"astype copies ({pct:.0f}%)"
    if cat == "kernel":
        rate = flops / split["kernel"] / rates["gemm"] if split["kernel"] else 0.0
        return f"kernel ({pct:.0f}%) at {100 * rate:.0f}% of GEMM rate"
    where = "dask+xarray" if cat == "dask" else cat
    return f"Python overhead: {n_tasks} tasks, {pct:.0f}% in {where}"


def analyzer_rows(paths: dict[str, Path], rates: dict[str, float], skip: set[str]) -> list[list[Any]]:
    import dask

    from headstore import open_store
    from headstore.analyze.registry import analyzers

    runs = _runs()
    rows = []
    specs = analyzers()
    order = sorted(specs, key=lambda n: (n in LAST, n))  # the slow ones last: a cut-short run still shows the rest
    for name in order:
        spec, run = specs[name], runs.get(name)
        if run is None or name in skip:
            why = "skipped (--skip)" if name in skip else "no store configured in bench/limits.py"
            rows.append([name, "-", *["-"] * (len(HEADER) - 3), f"not run: {why}"])
            continue
        ps = [paths[k] for k in run.stores]
        dss = [open_store(p) for p in ps]
        z = sizes(dss[0])
        params = run.params(z, dss[0])
        nbytes = read_bytes(name, spec, ps, dss, params)
        flops, exps = cost(name, z, params)
        parts = {"read": nbytes / rates["read"], "FLOPs": flops / rates["gemm"], "exps": exps / rates["exp"]}
        bound = max(parts, key=lambda k: parts[k])
        limit = parts[bound]
        where = "+".join(run.stores)

        def call(ps: list[Path] = ps, params: dict[str, Any] = params, spec: Any = spec) -> Any:
            return spec.func(*[open_store(p) for p in ps], **params)

        try:  # the profiled synchronous run also warms the page cache for the timed ones
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            with dask.config.set(scheduler="sync"):
                prof.enable()
                try:
                    res = call()
                    n_tasks = _tasks(res)
                    res.compute()
                finally:
                    prof.disable()
            t_sync = time.perf_counter() - t0
            repeat = 1 if t_sync > SLOW_S else 3
            t = C.timeit(lambda: call().compute(), repeat=repeat, warmup=0)
        except Exception as e:  # an analyzer that needs what its store lacks
            rows.append([name, where, *["-"] * (len(HEADER) - 3), f"not run: {type(e).__name__}: {str(e)[:80]}"])
            continue
        split, total, hottest = profile_split(pstats.Stats(prof))
        pcts = [round(100 * split[c] / total) for c in CATS]
        why = held_back(limit / t, bound, split, total, flops, rates, n_tasks)
        rows.append([name, where, nbytes / 1e6, flops / 1e9, exps / 1e6, limit, t, limit / t, bound, *pcts, n_tasks,
                     hottest, why])  # fmt: skip
        print(f"{name}: limit {limit:.3g} s, measured {t:.3g} s (sync+profile {t_sync:.3g} s): {why}", flush=True)
    return sorted(rows, key=lambda r: str(r[0]))


def scheduler_rows(paths: dict[str, Path], repeat: int) -> list[list[Any]]:
    """copy-suppression and attention-stats under dask's threaded and synchronous schedulers, interleaved."""
    import dask

    from headstore import open_store
    from headstore.analyze.registry import analyzers

    specs = analyzers()
    rows = []
    for name in ("copy-suppression", "attention-stats"):
        got: dict[str, list[float]] = {"threads": [], "sync": []}
        for _ in range(repeat):
            for sched in got:
                with dask.config.set(scheduler=sched):
                    t0 = time.perf_counter()
                    specs[name].func(open_store(paths["text"])).compute()
                    got[sched].append(time.perf_counter() - t0)
        th, sy = (float(np.median(got[k])) for k in ("threads", "sync"))
        rows.append([name, th, sy, sy / th])
    return rows


def pipeline_rows(path: Path, repeat: int) -> list[list[Any]] | None:
    """Each bulk field read whole through open_store with zarrs (auto) and zarr-python, interleaved
    (None where this checkout has no ``codec_pipeline``)."""
    import zarr

    from headstore import open_store

    try:
        from headstore.store_schema.read.codec_pipeline import prefer, zarrs_twin
    except ImportError:
        return None
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


def report(args: argparse.Namespace, paths: dict[str, Path], rates: dict[str, float], rows: list, srows: list,
           prows: list | None, wall: float) -> str:  # fmt: skip
    cmd = "python bench/limits.py" + (" --quick" if args.quick else "")
    cmd += f" --skip {args.skip}" if args.skip else ""
    below = [r[0] for r in rows if isinstance(r[7], float) and r[7] < 0.5]
    names = "\n".join(f"- `{k}`: `{p.name}`" for k, p in paths.items())
    pipe = (
        "This checkout has no `headstore.store_schema.read.codec_pipeline`: the codec pipelines were not compared."
        if prows is None
        else f"""Whole fields read through `open_store` (warm page cache), zarrs' pipeline (whole shards) vs zarr-python's,
interleaved, fastest of the rounds after a warm-up round; "CPU ratio" = process CPU seconds (every thread) zarr-python / zarrs:

{C.table(PIPE_HEADER, prows)}

"direct": the zarr array read whole with `arr[...]`, without `open_store` or dask; the other columns time
`open_store(path)[field].values` (opened once before the rounds: dask reads the store again on each)."""
    )
    return f"""## (l) Every analyzer against its own limit

Command: `{cmd}` ({wall / 60:.1f} min in all) — machine: {C.machine()}.
**Absolute times and rates depend on the load** ({CORES} usable cores, shared with other jobs when the load average
above says so); the limits are measured in the same run, so each ratio is side by side.

Stores (float32, sharded):
{names}

Machine limits, measured in the same run: page-cache read {rates["read"] / 1e9:.2f} GB/s (every file of the
text store into one buffer, after a warm-up pass; the disk itself was not measured: the page cache cannot be
dropped here), float32 GEMM {rates["gemm"] / 1e9:.1f} GFLOP/s (1024^3 matmul), exp {rates["exp"] / 1e6:.0f} M/s
({CORES} threads).

{C.table(HEADER, rows)}

- "limit" = max(reads / read rate, FLOPs / GEMM rate, exps / exp rate), "bound" the largest of the three: what the
  analyzer could not beat here even with reads, arithmetic and exps perfectly overlapped and every FLOP (elementwise
  passes included) at the GEMM rate. "measured" = median wall seconds of 3 runs with dask's default (threaded)
  scheduler after a profiled warm-up run (1 run where that one took over {SLOW_S:.0f} s).
- reads = bytes on disk of the fields the analyzer reads (its registry `requires`, and from a second store the
  fields it reads there), only the layers it touches (inner chunks hold one layer); a derived field (`result` =
  z @ W_O, `z` = pattern @ v, `pattern` from q, k) costs its inputs' bytes. Weights count whole (`W_U`, `W_E`: one
  uncompressed chunk with a crc32c, read whole for any column).
- FLOPs and exps: `cost()` in bench/limits.py, from each analyzer's formula (its module docstring): the minimum
  arithmetic, not what the implementation does (e.g. calibration, projection-loss: 2 m n k per product in the cheaper
  order, six elementwise passes per log-softmax; ifelse-detector: 9 F^3 per Ledoit-Wolf precision `pinvh`).
- The % columns split the own time (cProfile tottime) of one run under `dask.config.set(scheduler="sync")`: read =
  zarr / zarrs / codecs / store reads and the lock waits on zarr's event-loop thread; concat = dask's
  concatenate3 / rechunk; astype = astype and ascontiguousarray copies; kernel = the analyzer's modules
  (`headstore/analyze/`) and the numpy they call, directly, through xarray or as a dask task; dask+xarray = dask's
  and xarray's own Python (graph building, scheduling, bookkeeping); other = the rest. numpy, builtins and the
  standard library are charged to their callers; imports are left out. "tasks" = the dask graph
  of the analyzer's (lazy) result, 0 where it computes eagerly. "hottest" = the function with most own time.
- "what holds it back": where limit / measured < 0.5, the profile's largest share (for the kernel: its FLOPs per
  second of kernel time against the GEMM rate).

Below 0.5 of the limit in this run: {", ".join(below) if below else "none"}.

Schedulers (on `{paths["text"].name}`): median wall seconds of {args.sched_rounds} interleaved runs.

{C.table(["analyzer", "threaded s", "sync s", "sync / threaded"], srows)}

{pipe}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny-gpt2 stores, a check of the script")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="text")
    ap.add_argument("--n-seq", type=int, default=8, help="sequences of the text store")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-ioi", type=int, default=16, help="sequences of the IOI / ABC stores")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per pipeline read (default 6, quick 2)")
    ap.add_argument("--sched-rounds", type=int, default=3, help="runs per scheduler in the scheduler table")
    ap.add_argument("--skip", default="", help="analyzers not run, comma-separated (e.g. projection-loss)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    t0 = time.perf_counter()
    paths = stores(args)
    rates = {"read": read_bandwidth(paths["text"]), "gemm": gemm_rate(), "exp": exp_rate()}
    print(f"rates: read {rates['read'] / 1e9:.2f} GB/s, GEMM {rates['gemm'] / 1e9:.1f} GFLOP/s, exp "
          f"{rates['exp'] / 1e6:.0f} M/s", flush=True)  # fmt: skip
    rows = analyzer_rows(paths, rates, set(filter(None, args.skip.split(","))))
    srows = scheduler_rows(paths, args.sched_rounds)
    prows = pipeline_rows(paths["text"], args.rounds or (2 if args.quick else 6))
    body = report(args, paths, rates, rows, srows, prows, time.perf_counter() - t0)
    print(body)
    if not args.no_write:
        C.write_section("limits" + ("_quick" if args.quick else ""), body)


if __name__ == "__main__":
    main()
