"""(g) ``headstore dashboard`` on text stores of two sizes (10^4 and 10^5 tokens of SmolLM2-135M: all 270 heads):
seconds, peak RSS (VmHWM of a fresh process), site size and the largest page. Memory should stay flat as the
store grows tenfold (the analyzers stream one batch chunk at a time), and so should the pages (examples, not arrays).

    python bench/dashboard.py [--quick] [--model smollm2-135m]

``--quick``: tiny-llama, 10^3 and 4 x 10^3 tokens (about a minute).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

QUICK_NOTE = (
    "A quick run on the tiny model: the issue's figures (all 270 SmolLM2 heads, 10^4 and 10^5 tokens) come from "
    "`python bench/dashboard.py` (extracting its stores takes a while on a CPU).\n\n"
)
RUN = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from headstore.report.dashboard import write_dashboard
write_dashboard(sys.argv[1], Path(sys.argv[2]))
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"s": seconds, "peak_mb": int(hwm.split()[1]) / 1024}))
"""


def dashboard(store: Path) -> dict[str, Any]:
    """Run the dashboard on ``store`` in a fresh process: its seconds, peak RSS and what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        proc = subprocess.run([sys.executable, "-c", RUN, str(store), str(site)], capture_output=True, text=True,
                              cwd=C.ROOT, check=True)  # fmt: skip
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        pages = [p.stat().st_size for p in site.rglob("*.html")]
        out.update({"pages": len(pages), "site_mb": sum(pages) / 1e6, "largest_kb": max(pages) / 1e3})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    sizes = (8, 32) if args.quick else (80, 800)  # sequences of 128 tokens
    rows = []
    for n_seq in sizes:
        store = C.store(model, "text", n_seq, 8, dtype="float16", seq_len=128)
        r = dashboard(store)
        print(f"{n_seq * 128} tokens: {r}")
        rows.append([n_seq * 128, r["pages"] - 1, round(r["s"], 1), round(r["peak_mb"]), round(r["site_mb"], 2),
                     round(r["largest_kb"], 1)])  # fmt: skip
    body = f"""## (g) Dashboard: every head's page from a store (`bench/dashboard.py{" --quick" if args.quick else ""}`)

`headstore dashboard` on `{model}` text stores (float16, 128-token windows, batch chunks of 8), in a fresh process:
census scores, top attention, top effects, head similarity, OV/QK circuits and one page per head.

{C.table(["tokens", "head pages", "seconds", "peak RSS MB", "site MB", "largest page KB"], rows)}

{QUICK_NOTE if args.quick else ""}Machine: {C.machine()}.
"""
    C.write_section("dashboard", body)


if __name__ == "__main__":
    main()
