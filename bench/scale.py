"""(e) Stores at research scale: SmolLM2 text stores of about 10^3, 10^4 and 10^5 tokens (float16).

Per size: extraction throughput (the batch loop, and end to end), bytes per token, files, and then
copy-suppression on the store in a fresh process: seconds and peak RSS (the process's VmHWM). The
stores share one weights store (``--weights``), so each holds activations and per-layer weights only.
Time should grow linearly with the tokens; memory should not (copy-suppression's own output,
``per_position``, is n_layers x n_heads floats per token: it is counted apart).

    python bench/scale.py [--sizes 1000,10000,100000] [--model smollm2-135m] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ANALYZE = r"""
import json, statistics, sys, threading, time
import headstore
from headstore.analyze import copy_suppression

def rss_mb():
    return int([ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:")][0].split()[1]) / 1024

samples, running = [], True
def sample():  # RSS every 0.25 s: a trend would show as a later half higher than the earlier one
    while running:
        samples.append(rss_mb())
        time.sleep(0.25)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if sys.argv[2] == "cli":  # what `headstore analyze copy-suppression STORE --out OUT` runs: result streamed to disk
    from pathlib import Path
    from headstore.cli.registry import analyzers
    from headstore.cli.run import run_analyzer
    run_analyzer(analyzers()["copy-suppression"], [sys.argv[1]], Path(sys.argv[3]))
    out_mb = sum(p.stat().st_size for p in Path(sys.argv[3]).rglob("*") if p.is_file()) / 1e6
else:  # the Python call, every output computed into memory
    res = copy_suppression(headstore.open_store(sys.argv[1])).compute()
    out_mb = sum(v.nbytes for v in res.data_vars.values()) / 1e6
running = False
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
half = len(samples) // 2
print(json.dumps({"s": time.perf_counter() - t0, "peak_mb": int(hwm[0].split()[1]) / 1024, "output_mb": out_mb,
                  "early_mb": statistics.median(samples[:half] or samples), "late_mb": statistics.median(samples[half:])}))
"""


def analyze(store: Path, how: str) -> dict[str, float]:
    # a fresh process: its peak is the analysis's own (getrusage's maxrss would keep this process's)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = store.with_name(store.name + "-analysis")
    proc = subprocess.run([sys.executable, "-c", ANALYZE, str(store), how, str(out)], capture_output=True, text=True,
                          env=env, timeout=7200, check=False)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    res: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000", help="approximate tokens per store")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: removed after measuring)")
    args = ap.parse_args()

    from headstore.extract import ExtractRequest, extract
    from headstore.store_schema.read.info import store_info

    root = C.CACHE / "scale"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    weights = root / f"weights-{args.model}.zarr"
    rows, raw = [], []
    for size in (int(s) for s in args.sizes.split(",")):
        n_seq = -(-size // args.seq_len)
        n_seq = -(-n_seq // args.batch_size) * args.batch_size  # whole batches
        out = root / f"text-{size}.zarr"
        t0 = time.perf_counter()
        res = extract(ExtractRequest(model=args.model, data="text", out=str(out), n_seq=n_seq, seq_len=args.seq_len,
                                     batch_size=args.batch_size, dtype="float16", device="cpu", progress=False,
                                     weights=str(weights)))  # fmt: skip
        wall = time.perf_counter() - t0
        info = store_info(str(out))
        n_tok = info["n_sequences"] * args.seq_len
        assert info["n_complete"] == n_seq, (info["n_complete"], n_seq)
        fields = info["provenance"]["fields"]
        act = sum(v[0] for k, v in info["sizes"].items() if k in fields)
        cli, mem = analyze(out, "cli"), analyze(out, "memory")
        r = {
            "tokens": n_tok, "fill_tok_s": res.n_tokens_written / res.fill_seconds, "extract_s": wall,
            "setup_s": res.setup_seconds, "fill_s": res.fill_seconds, "act_b_tok": act / n_tok,
            "store_gb": info["total_bytes"] / 1e9, "files": info["n_files"],
            **{f"cli_{k}": v for k, v in cli.items()}, **{f"mem_{k}": v for k, v in mem.items()},
        }  # fmt: skip
        raw.append(r)
        print(json.dumps(r), flush=True)
        rows.append([n_tok, round(r["fill_tok_s"]), round(wall, 1), round(r["act_b_tok"]), round(r["store_gb"], 3),
                     r["files"], round(cli["s"], 1), round(cli["peak_mb"]),
                     f"{cli['early_mb']:.0f} / {cli['late_mb']:.0f}", round(mem["s"], 1), round(mem["peak_mb"]),
                     round(mem["output_mb"], 1)])  # fmt: skip
        if not args.keep:
            shutil.rmtree(out)
    w_mb = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) / 1e6
    first, last = raw[0], raw[-1]
    k = last["tokens"] / first["tokens"]
    per_ktok = [1e3 * r["fill_s"] / r["tokens"] for r in raw]
    cmd = "python bench/scale.py" + ("" if args.sizes == "1000,10000,100000" else f" --sizes {args.sizes}")
    body = f"""## (e) Stores at research scale: SmolLM2 text, 10^3 to 10^5 tokens

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}`, data `text` (stdlib docstrings), {args.seq_len} tokens per sequence, batch {args.batch_size},
default fields, float16, sharded layout; the stores share one weights store (`--weights`, {w_mb:.0f} MB,
written by the first, whose set-up includes computing `W_EE`). Copy-suppression (all heads) runs in a fresh
process per store, twice: as `headstore analyze copy-suppression` runs it (result streamed to `result.zarr`,
summary and plot) and as the Python call `copy_suppression(ds).compute()` (every output in memory);
seconds, peak RSS (VmHWM) and the median RSS of the first and the second half of the run (sampled every
0.25 s: memory that grew with the sequences read would show as a later half above the earlier one). "output"
is the in-memory result: `per_position` is n_layers x n_heads floats per token, so it grows with the store by
definition.

{C.table(["tokens", "fill tokens/s", "extract s (end to end)", "activation B/token", "store GB", "files",
          "analyze s", "analyze peak MB", "analyze RSS MB (1st / 2nd half)", "compute() s", "compute() peak MB", "output MB"], rows)}

- Over {k:.0f}x the tokens the fill took {last["fill_s"] / first["fill_s"]:.0f}x the time
  ({", ".join(f"{x:.2f}" for x in per_ktok)} s per 1,000 tokens); end to end {last["extract_s"] / first["extract_s"]:.1f}x
  (set-up {first["setup_s"]:.0f} s, {last["setup_s"]:.0f} s). `headstore analyze copy-suppression`:
  {last["cli_s"] / first["cli_s"]:.1f}x the time, peak RSS {first["cli_peak_mb"]:.0f} -> {last["cli_peak_mb"]:.0f} MB,
  median RSS {first["cli_late_mb"]:.0f} -> {last["cli_late_mb"]:.0f} MB (second halves);
  `compute()` into memory: {first["mem_peak_mb"]:.0f} -> {last["mem_peak_mb"]:.0f} MB, the growth being its
  own output ({last["mem_output_mb"]:.0f} MB at the largest size, held ~3 times over while dask assembles it).
- Files: {", ".join(str(r["files"]) for r in raw)} (one shard per field and batch, plus ~40 metadata and
  per-layer weight files).
"""
    C.write_section("scale", body)


if __name__ == "__main__":
    main()
