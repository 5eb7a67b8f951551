"""(b) Extraction throughput vs a plain forward pass on the same tokens (SmolLM2, ~32 x 128 text
tokens); a cProfile of the extraction when the ratio is under 0.7.

    python bench/extract_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    n_seq = 8 if args.quick else 32
    seq_len, bs = 128, 8

    from headstore.extract import ExtractRequest, extract
    from headstore.extract.data import DataRequest, build_dataset
    from headstore.extract.models import load_model

    lm = load_model(args.model, "cpu")
    toks = build_dataset(DataRequest("text", n_seq, seq_len, 0, True), lm.tokenizer, lm.config_dict()["n_ctx"]).tokens
    n_tok = int(toks.size)

    def run_extract(tmp: str, tag: str) -> float:
        req = ExtractRequest(model=args.model, data="text", out=f"{tmp}/{tag}.zarr", n_seq=n_seq, seq_len=seq_len,
                             batch_size=bs, device="cpu", progress=False)  # fmt: skip
        res = extract(req)
        return res.seconds

    with tempfile.TemporaryDirectory() as tmp:
        # extract() includes model load + dataset + store creation; model load is timed separately.
        t0 = time.perf_counter()
        load_model(args.model, "cpu")
        t_load = time.perf_counter() - t0
        t_plain = C.timeit(lambda: C.plain_forward(lm.bridge, toks, bs), repeat=1, warmup=1)
        t_extract = run_extract(tmp, "r0")
        prof = cProfile.Profile()
        prof.enable()
        run_extract(tmp, "prof")
        prof.disable()
        size = sum(p.stat().st_size for p in Path(f"{tmp}/prof.zarr").rglob("*") if p.is_file())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(18)
    stats = s.getvalue()
    st = pstats.Stats(prof)
    total = max(v[3] for v in st.stats.values())  # type: ignore[attr-defined]

    def cum(fragment: str) -> float:
        return sum(v[3] for k, v in st.stats.items() if fragment in f"{k[0]}:{k[2]}")  # type: ignore[attr-defined]

    parts = {
        "model load (load_model)": cum("models.py:load_model"),
        "forward with cache (run_with_cache)": cum("run_with_cache"),
        "store creation (create_store, weights, W_EE)": cum("io.py:create_store") + cum("effective_embedding"),
        "writing batches (write_batch, main-thread wait)": cum("io.py:write_batch"),
    }
    tps_plain, tps_ext = n_tok / t_plain, n_tok / t_extract
    t_fill = t_extract - t_load
    ratio_end_to_end = tps_ext / tps_plain
    ratio_fill = t_plain / t_fill
    print(f"plain {tps_plain:.0f} tok/s; extract {tps_ext:.0f} tok/s end to end (ratio {ratio_end_to_end:.2f}); "
          f"excluding model load {n_tok / t_fill:.0f} tok/s (ratio {ratio_fill:.2f})")  # fmt: skip
    print(stats[:4000])
    rows = [
        ["plain forward (logits only, no hooks)", t_plain, tps_plain, 1.0],
        ["extract, end to end (load + create + forward + write)", t_extract, tps_ext, ratio_end_to_end],
        ["extract minus model load", t_fill, n_tok / t_fill, ratio_fill],
    ]
    prof_rows = [[k, v, v / total] for k, v in parts.items()]
    goal = "met" if ratio_fill >= 0.7 else "**not met**"
    cmd = "python bench/extract_overhead.py" + (" --quick" if args.quick else "")
    body = f"""## (b) Extraction overhead

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}`, data `text` (stdlib docstrings), {n_seq} sequences x {seq_len} tokens = {n_tok} tokens,
batch {bs}, default fields, float32 ({size / n_tok:.0f} bytes/token on disk). One timed run each\n(plain forward after one warm-up run; the extraction is profiled in a second, separate run).

{C.table(["run", "seconds", "tokens/s", "tokens/s ÷ plain"], rows)}

Goal extract ≥ 0.7 x plain-forward throughput: {goal} (ratio {ratio_fill:.2f} without model load,
{ratio_end_to_end:.2f} end to end; model load {t_load:.1f} s).

Where the time of one extraction goes (cProfile, cumulative seconds; the profiler itself slows
Python-heavy parts):

{C.table(["part", "seconds", "share"], prof_rows)}

<details><summary>cProfile top entries (cumulative)</summary>

```
{stats.strip()[:6000]}
```
</details>
"""
    C.write_section("extract_overhead", body)


if __name__ == "__main__":
    main()
