"""(b) Extraction throughput vs a plain forward pass of the same model on the same tokens.

Plain forward passes and extractions alternate (``--repeat`` rounds, medians), so a change of
machine load hits both sides alike. Wall seconds and process CPU seconds are both recorded (CPU
seconds include the background writer and zarr's codec threads, and move less with the load of
other jobs). ``fill`` is the batch loop alone (forward passes with overlapped writes), which is what
a long extraction spends its time on; ``set-up`` (model load, weights, ``W_EE``, store creation) is
paid once per store and is reported on its own.

    python bench/extract_overhead.py [--quick] [--device cuda] [--model tiny-gpt2]
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n_seq = 16 if args.quick else 48
    seq_len, bs = 128, 8

    from headstore.extract import ExtractRequest, extract
    from headstore.extract.data import DataRequest, build_dataset
    from headstore.extract.models import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model, args.device)
    t_load = time.perf_counter() - t0
    toks = build_dataset(DataRequest("text", n_seq, seq_len, 0, True), lm.tokenizer, lm.config_dict()["n_ctx"]).tokens
    n_tok = int(toks.size)
    C.plain_forward(lm.bridge, toks[:bs], bs)  # warm-up

    plain_wall, plain_cpu, fill_wall, fill_cpu, setup, wait = [], [], [], [], [], []
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            w, c = time.perf_counter(), time.process_time()
            C.plain_forward(lm.bridge, toks, bs)
            C.sync(args.device)
            plain_wall.append(time.perf_counter() - w)
            plain_cpu.append(time.process_time() - c)

            out = Path(tmp) / f"r{r}.zarr"
            req = ExtractRequest(model=args.model, data="text", out=str(out), n_seq=n_seq, seq_len=seq_len,
                                 batch_size=bs, device=args.device, progress=False)  # fmt: skip
            res = extract(req)
            assert res.n_tokens_written == n_tok, (res.n_tokens_written, n_tok)
            fill_wall.append(res.fill_seconds)
            fill_cpu.append(res.fill_cpu_seconds)
            setup.append(res.setup_seconds)
            wait.append(res.write_wait_seconds)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"round {r}: plain {plain_wall[-1]:.2f} s, extract fill {res.fill_seconds:.2f} s "
                  f"(writer wait {res.write_wait_seconds:.2f} s), set-up {res.setup_seconds:.2f} s")  # fmt: skip
    med = statistics.median
    pw, fw, sw = med(plain_wall), med(fill_wall), med(setup)
    ratio_fill, ratio_e2e = pw / fw, pw / (fw + sw)
    ratio_cpu = med(plain_cpu) / med(fill_cpu)
    tokens_for_90 = 9 * sw * (n_tok / fw)  # set-up is 10 % of the run at this many tokens
    rows = [
        ["plain forward (logits only, no hooks)", pw, n_tok / pw, 1.0, med(plain_cpu)],
        ["extract: fill (forward + hooks + overlapped writes)", fw, n_tok / fw, ratio_fill, med(fill_cpu)],
        ["extract: end to end (set-up + fill)", fw + sw, n_tok / (fw + sw), ratio_e2e, ""],
    ]
    goal = 0.8  # issue 13: on this CPU too (it was 0.7 before)
    met = "met" if ratio_fill >= goal else "**not met**"
    print(C.table(["run", "wall s", "tokens/s", "÷ plain", "CPU s (fill)"], rows))
    cmd = "python bench/extract_overhead.py" + (" --quick" if args.quick else "")
    cmd += "" if args.device == "cpu" else f" --device {args.device}"
    cmd += "" if args.model == "smollm2-135m" else f" --model {args.model}"
    body = f"""## (b) Extraction overhead

Command: `{cmd}` — machine: {C.machine()}.
Model `{args.model}` on `{args.device}`, data `text` (stdlib docstrings), {n_seq} sequences x {seq_len} tokens
= {n_tok} tokens, batch {bs}, default fields, float32 ({size / n_tok:.0f} bytes/token on disk).
Plain forward passes and extractions alternate, {args.repeat} rounds, medians; each extraction
creates a fresh store (model load included in its set-up).

{C.table(["run", "wall seconds", "tokens/s", "tokens/s ÷ plain", "CPU seconds (all threads)"], rows)}

Goal fill throughput ≥ {goal} x plain-forward throughput: {met} (wall ratio {ratio_fill:.2f};
CPU-seconds ratio {ratio_cpu:.2f}, which moves less with other jobs' load).

- The forward loop waited {med(wait):.2f} s in all for the background writer (median), i.e. writes were
  {"almost entirely" if med(wait) < 0.1 * fw else "not fully"} overlapped with the next batch's forward pass.
- Set-up, paid once per store: {sw:.1f} s wall (model load alone {t_load:.1f} s; the rest is the
  dataset, the processed weights, `W_EE` = the vocabulary through attention 0 and MLP0, and writing
  ~{3 * 4 * lm.config_dict()["d_vocab"] * lm.config_dict()["d_model"] / 1e6:.0f} MB of vocabulary-sized
  weights). It is {sw / (fw + sw):.0%} of this {n_tok}-token run; from about {tokens_for_90:,.0f} tokens on it is
  under 10 %, and the end-to-end ratio tends to the fill ratio.
- Per round (wall s): plain {", ".join(f"{x:.2f}" for x in plain_wall)}; fill {", ".join(f"{x:.2f}" for x in fill_wall)};
  set-up {", ".join(f"{x:.2f}" for x in setup)}.
"""
    C.write_section("extract_overhead", body)


if __name__ == "__main__":
    main()
