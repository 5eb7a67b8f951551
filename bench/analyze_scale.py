"""(m) Copy suppression at 10^3, 10^4 and 10^5 tokens of one model: seconds per token and the read rate, each size
in a fresh process (the stores of bench/scale.py's sizes: SmolLM2 text, 128-token windows, batches of 8,
float16, default fields). Linear scaling means the per-token time at 10^5 tokens stays within 1.2x of 10^4's.

    python bench/analyze_scale.py [--quick] [--model smollm2-135m] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

# one fresh process per store: open, then the fastest of ``repeat`` computes (the first warms the page cache)
RUN = """
import json, sys, time
from headstore import open_store
from headstore.analyze import copy_suppression
from headstore.analyze.registry import analyzers
path, repeat = sys.argv[1], int(sys.argv[2])
ds = open_store(path)
fields = [n for n in analyzers()["copy-suppression"].requires if n in ds.variables]
nbytes = sum(int(ds[n].nbytes) for n in fields)  # as dask reads them (stored dtype), weights included
times = []
for _ in range(repeat + 1):
    t = time.perf_counter()
    copy_suppression(open_store(path)).compute()
    times.append(time.perf_counter() - t)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
print(json.dumps({"s": min(times[1:]), "bytes": nbytes, "tokens": int(ds["tokens"].size),
                  "peak_mb": int(hwm.split()[1]) / 1024}))
"""


def measure(store: Path, repeat: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", RUN, str(store), str(repeat)], capture_output=True, text=True,
                          cwd=C.ROOT, check=True)  # fmt: skip
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 10^3 and 10^4 tokens")
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    sizes = (8, 80) if args.quick else (8, 80, 800)  # sequences of 128 tokens
    rows, per_token = [], []
    for n_seq in sizes:
        store = C.store(model, "text", n_seq, 8, dtype="float16", seq_len=128)
        r = measure(store, args.repeat)
        per_token.append(r["s"] / r["tokens"])
        print(f"{r['tokens']} tokens: {r}")
        rows.append([r["tokens"], round(r["s"], 2), round(1e6 * r["s"] / r["tokens"], 1),
                     round(r["bytes"] / 1e9, 3), round(r["bytes"] / r["s"] / 1e9, 3), round(r["peak_mb"])])  # fmt: skip
    ratio = per_token[-1] / per_token[-2]
    cmd = "python bench/analyze_scale.py" + (" --quick" if args.quick else "")
    body = f"""## (m) Copy suppression from 10^3 to 10^5 tokens: time per token and read rate (`{cmd}`)

`{model}` text stores (float16, 128-token windows, batches of 8, default fields, sharded), one fresh process per
store: `copy_suppression(open_store(path)).compute()` (all heads, every output in memory), the fastest of
{args.repeat} runs after one that warms the page cache. "read" is the bytes of the fields it declares, as stored
(weights included), over its time.

{C.table(["tokens", "seconds", "us per token", "reads GB", "read GB/s", "peak RSS MB"], rows)}

Time per token at the largest size / the one 10x smaller: **{ratio:.2f}x** (linear: at most 1.2x). The read rate
is the bytes over the whole time: copy suppression's bound is its `W_O @ W_U` product, not its reads (section (l)).

Machine: {C.machine()}.
"""
    print(body)
    C.write_section("analyze_scale" + ("_quick" if args.quick else ""), body)


if __name__ == "__main__":
    main()
