"""(j) Attribution from the store (issue 26): store-based AtP + EAP over all heads vs the online method (the
live bridge, gradients recomputed), EAP's rate against its edge products' FLOPs and this machine's GEMM rate,
peak memory over 10x the sequences, and what ``extract --grad`` costs in time and bytes.

    python bench/attribution.py [--quick] [--model smollm2-135m] [--n-seq 16] [--batch-size 8] [--mem-factor 10]

``--quick`` runs tiny-gpt2 on 8 and 32 sequences (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

METRIC = "logit-diff:io_token,s_token@end_pos"
CORRUPT_FIELDS = ("default", "resid_pre")  # what the corrupt side needs: z, resid_pre, resid_final


def pair(model: str, n_seq: int, bs: int) -> tuple[Path, Path]:
    """(clean store with gradients, corrupt store) of the same IOI prompts (ioi / ioi-abc, same seed)."""
    clean = C.store(model, "ioi", n_seq, bs, grad=METRIC)
    corrupt = C.store(model, "ioi-abc", n_seq, bs, fields=CORRUPT_FIELDS)
    return clean, corrupt


def store_scores(clean: Path, corrupt: Path) -> tuple[Any, Any]:
    """AtP and EAP of every head / edge, from the stores (opened afresh: nothing cached between runs)."""
    from headstore import open_store
    from headstore.analyze import attribution_patching, edge_attribution

    c, k = open_store(clean), open_store(corrupt)
    atp = attribution_patching(c, k)["score"].values
    eap = edge_attribution(c, k)["score"].values
    return atp, eap


# --- the online method: the live bridge, a corrupt forward, a clean forward and backward per batch -----------


def _online_batch(bridge: Any, toks: np.ndarray, bad: np.ndarray, cols: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """Sums over one batch's sequences of AtP (layer, head) and EAP (sender, receiver) terms, as the online tools
    take them (TransformerLens hooks: split q/k/v inputs, hook_mlp_in, per-head results, hook_mlp_out)."""
    import torch

    n_layers = bridge.cfg.n_layers
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    send_hooks = ["blocks.0.hook_resid_pre"]
    for L in range(n_layers):
        send_hooks += [f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_mlp_out"]
    recv_hooks = [f"blocks.{L}.{h}" for L in range(n_layers)
                  for h in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")] + [last]  # fmt: skip
    z_hooks = [f"blocks.{L}.attn.hook_z" for L in range(n_layers)]
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        if name == "blocks.0.hook_resid_pre" and torch.is_grad_enabled():  # the leaf (the weights are frozen)
            t = t.detach().requires_grad_(True)
        acts[name] = t.detach()
        if t.requires_grad and name not in send_hooks:
            t.register_hook(lambda g: grads.__setitem__(name, g))
        return t

    fwd = [(n, lambda t, hook, n=n: keep(t, hook, n)) for n in (*send_hooks, *z_hooks, *recv_hooks)]
    with torch.no_grad():
        bridge.run_with_hooks(torch.as_tensor(bad, dtype=torch.long), fwd_hooks=fwd, return_type="logits")
    corrupt = {n: acts[n] for n in (*send_hooks, *z_hooks)}
    acts.clear()
    x = torch.as_tensor(toks, dtype=torch.long)
    with torch.enable_grad():
        logits = bridge.run_with_hooks(x, fwd_hooks=fwd, return_type="logits")
        b = torch.arange(x.shape[0])
        end, io, s = (torch.as_tensor(cols[c], dtype=torch.long) for c in ("end_pos", "io_token", "s_token"))
        (logits[b, end, io] - logits[b, end, s]).sum().backward()
    atp = torch.stack([((corrupt[n] - acts[n]) * grads[n]).sum((0, 1, 3)) for n in z_hooks])
    send = [(corrupt[n] - acts[n]) for n in send_hooks]
    send = [t if t.ndim == 4 else t[:, :, None] for t in send]  # (batch, pos, node, d_model)
    recv = [grads[n] if grads[n].ndim == 4 else grads[n][:, :, None] for n in recv_hooks]
    s_all = torch.cat(send, 2).permute(2, 0, 1, 3).reshape(sum(t.shape[2] for t in send), -1)
    r_all = torch.cat(recv, 2).permute(2, 0, 1, 3).reshape(sum(t.shape[2] for t in recv), -1)
    return atp.double(), (s_all @ r_all.T).double()


def online_scores(bridge: Any, toks: np.ndarray, bad: np.ndarray, cols: dict[str, np.ndarray], bs: int) -> Any:
    """AtP (layer, head) and EAP (sender, receiver) over all sequences, batch by batch, on the live bridge."""
    from headstore.extract.grad import _grad_mode

    names = ("split_qkv_input", "hook_mlp_in", "attn_result")
    was = {n: bool(getattr(bridge.cfg, f"use_{n}", False)) for n in names}
    for n in names:
        getattr(bridge, f"set_use_{n}")(True)
    atp = eap = None
    try:
        with _grad_mode(bridge):  # weights frozen: no weight gradients, as extract --grad runs it
            for s in range(0, toks.shape[0], bs):
                sl = slice(s, s + bs)
                a, e = _online_batch(bridge, toks[sl], bad[sl], {k: v[sl] for k, v in cols.items()})
                atp, eap = (a, e) if atp is None else (atp + a, eap + e)
    finally:
        for n in names:
            getattr(bridge, f"set_use_{n}")(was[n])
    assert atp is not None and eap is not None
    return atp.numpy() / toks.shape[0], eap.numpy() / toks.shape[0]


def rel(got: np.ndarray, want: np.ndarray) -> float:
    ok = ~np.isnan(got)
    return float(np.abs(got[ok] - want[ok]).max() / np.abs(want[ok]).max())


# --- EAP against its FLOPs -----------------------------------------------------------------------------------


def gemm_rate(m: int, k: int, n: int, repeat: int) -> float:
    """GFLOP/s of a float32 numpy (m, k) @ (k, n), best of ``repeat``."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    t = C.timeit(lambda: a @ b, repeat=repeat, stat=min)
    return 2 * m * k * n / t / 1e9


def eap_parts(clean: Path, corrupt: Path, repeat: int) -> dict[str, float]:
    """Seconds of EAP's parts on the first batch chunk, read into memory first: senders, receivers, the product."""
    from headstore import open_store
    from headstore.analyze import _edge_attribution as E

    c, k = open_store(clean), open_store(corrupt)
    sl = E._batch_slices(c)[0]
    a = {f"{p}_{n}": np.asarray(E._data(ds[n], sl), np.float32) for n in E._PER_SEQUENCE
         for p, ds in (("c", c), ("k", k))}  # fmt: skip
    a.update({n: np.asarray(E._data(c[n], sl), np.float32) for n in E._CLEAN_ONLY})
    w = {n: np.asarray(c[n].values, np.float32) for n in ("W_Q", "W_K", "W_V", "W_O")}
    cfg = c.hs.config
    ln = cfg.normalization_type == "LN"
    n_b = a["c_z"].shape[0]
    one = [{key: v[b] for key, v in a.items()} for b in range(n_b)]
    t_send = C.timeit(lambda: [E._senders(o, w) for o in one], repeat=repeat, stat=min) / n_b
    t_recv = C.timeit(lambda: [E._receivers(o, w, ln) for o in one], repeat=repeat, stat=min) / n_b
    s, r = E._senders(one[0], w), E._receivers(one[0], w, ln)
    s2, r2 = s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1)
    blocks = E._blocks(E._edges(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.parallel_residual))

    def blocked() -> None:
        for r0, r1, n in blocks:
            s2[:n] @ r2[r0:r1].T

    t_dense = C.timeit(lambda: s2 @ r2.T, repeat=repeat, stat=min)
    t_prod = C.timeit(blocked, repeat=repeat, stat=min)
    t_chunk = C.timeit(lambda: E._chunk_scores(a, w, ln, blocks), repeat=repeat, stat=min) / n_b
    return {"senders": t_send, "receivers": t_recv, "product": t_prod, "dense": t_dense, "chunk": t_chunk,
            "S": s.shape[0], "R": r.shape[0], "K": s2.shape[1],
            "blocked": sum((r1 - r0) * n for r0, r1, n in blocks)}  # fmt: skip


# --- peak memory: one fresh process per size ----------------------------------------------------------------


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def peak_child(clean: Path, corrupt: Path) -> None:
    """In a fresh process: RSS after the imports and opening the stores, then the peak over AtP + EAP."""
    from headstore import open_store
    from headstore.analyze import attribution_patching, edge_attribution

    c, k = open_store(clean), open_store(corrupt)
    base = _vm("VmRSS:")
    t0 = time.perf_counter()
    attribution_patching(c, k)["score"].compute()
    edge_attribution(c, k)["score"].compute()
    t = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak": _vm("VmHWM:"), "seconds": t}))


def peak(clean: Path, corrupt: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(C.ROOT)}
    out = subprocess.run([sys.executable, __file__, "--peak-child", str(clean), str(corrupt)], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


# --- extraction with and without --grad ----------------------------------------------------------------------


def extraction(model: str, n_seq: int, bs: int, repeat: int) -> dict[str, Any]:
    """Fastest wall seconds and activation bytes/token of the IOI extraction: default fields; default + resid_pre
    (what --grad adds besides the gradients); --grad (which adds resid_pre and the grad fields). Alternating."""
    from headstore import open_store
    from headstore.extract import ExtractRequest, extract
    from headstore.extract.models import load_model
    from headstore.store_schema.read.info import array_nbytes_on_disk

    load_model(model, "cpu")  # warm the model files and torch (every run below loads the model itself)
    kinds = {"default": {"fields": ("default",)}, "default+resid_pre": {"fields": CORRUPT_FIELDS},
             "default --grad": {"fields": ("default",), "grad": METRIC}}  # fmt: skip
    fill: dict[str, list[float]] = {k: [] for k in kinds}
    total: dict[str, list[float]] = {k: [] for k in kinds}
    size: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            for i, (name, kw) in enumerate(kinds.items()):
                out = f"{tmp}/{r}-{i}.zarr"
                t0 = time.perf_counter()
                res = extract(ExtractRequest(model=model, data="ioi", out=out, n_seq=n_seq, batch_size=bs,
                                             device="cpu", progress=False, **kw))  # fmt: skip
                total[name].append(time.perf_counter() - t0)
                fill[name].append(res.fill_seconds)
                ds = open_store(out)
                fields = list(ds.attrs["headstore"]["fields"])
                disk = array_nbytes_on_disk(out)
                size[name] = sum(disk[f] for f in fields) / (ds.sizes["batch"] * ds.sizes["pos"])
                grads = [f for f in fields if f.startswith("grad_")]
                if grads:
                    size["of which gradients"] = sum(disk[f] for f in grads) / (ds.sizes["batch"] * ds.sizes["pos"])
                shutil.rmtree(out)
    return {"fill": {k: min(v) for k, v in fill.items()}, "total": {k: min(v) for k, v in total.items()}, "bytes": size}


# --- the run ---------------------------------------------------------------------------------------------------


def measure(model: str, n_seq: int, bs: int, repeat: int, factor: int) -> dict[str, Any]:
    """Every figure of the report, side by side in this process (the peaks in fresh ones)."""
    from headstore import open_store
    from headstore.analyze import attribution_patching, edge_attribution
    from headstore.extract.models import load_model

    clean, corrupt = pair(model, n_seq, bs)
    c, k = open_store(clean), open_store(corrupt)
    toks, bad = np.asarray(c["tokens"].values), np.asarray(k["tokens"].values)
    cols = {n: np.asarray(c[n].values) for n in ("end_pos", "io_token", "s_token")}
    r: dict[str, Any] = {"n_tok": int(toks.size), "shape": toks.shape, "cfg": c.hs.config}
    r["t_atp"] = C.timeit(lambda: attribution_patching(open_store(clean), open_store(corrupt))["score"].values,
                          repeat=repeat, stat=min)  # fmt: skip
    r["t_eap"] = C.timeit(lambda: edge_attribution(open_store(clean), open_store(corrupt))["score"].values,
                          repeat=repeat, stat=min)  # fmt: skip
    r["t_store"] = C.timeit(lambda: store_scores(clean, corrupt), repeat=repeat, stat=min)
    atp_s, eap_s = store_scores(clean, corrupt)
    t0 = time.perf_counter()
    bridge = load_model(model, "cpu").bridge
    r["t_load"] = time.perf_counter() - t0
    r["t_online"] = C.timeit(lambda: online_scores(bridge, toks, bad, cols, bs), repeat=repeat, stat=min)
    atp_o, eap_o = online_scores(bridge, toks, bad, cols, bs)
    r["err_atp"], r["err_eap"] = rel(atp_s, atp_o), rel(eap_s, eap_o)
    edges = edge_attribution(c, k)["edge"].values
    r["eap"] = eap_parts(clean, corrupt, repeat)
    e = r["eap"]
    per_tok = toks.size * c.sizes["d_model"]
    r["macs_dense"], r["macs_edges"] = per_tok * e["S"] * e["R"], per_tok * int(edges.sum())
    r["macs_blocked"] = per_tok * e["blocked"]
    r["gemm_same"] = gemm_rate(e["S"], e["K"], e["R"], max(repeat, 3))
    r["gemm_big"] = gemm_rate(2048, 2048, 2048, max(repeat, 3))
    big = pair(model, n_seq * factor, bs)
    r["big_tok"] = int(open_store(big[0])["tokens"].size)
    r["disk"] = {n: sum(p.stat().st_size for p in Path(x).rglob("*") if p.is_file())
                 for n, x in (("small", clean), ("big", big[0]))}  # fmt: skip
    r["mem"] = {"small": peak(clean, corrupt), "big": peak(*big)}
    r["ext"] = extraction(model, n_seq, bs, repeat)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="default smollm2-135m (tiny-gpt2 with --quick)")
    ap.add_argument("--n-seq", type=int, default=0, help="sequences (default 16; 8 with --quick)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per batch (the stores' chunk)")
    ap.add_argument("--mem-factor", type=int, default=10, help="the memory part's larger run: this many x --n-seq")
    ap.add_argument("--repeat", type=int, default=0, help="timed runs (median; default 3, 1 with --quick)")
    ap.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        peak_child(Path(args.peak_child[0]), Path(args.peak_child[1]))
        return
    model = args.model or ("tiny-gpt2" if args.quick else "smollm2-135m")
    n_seq = args.n_seq or (8 if args.quick else 16)
    bs, repeat = min(args.batch_size, n_seq), args.repeat or (1 if args.quick else 3)
    r = measure(model, n_seq, bs, repeat, args.mem_factor)
    report(args, model, n_seq, bs, repeat, r)


def report(args: argparse.Namespace, model: str, n_seq: int, bs: int, repeat: int, r: dict[str, Any]) -> None:
    cfg, e, ext, mem = r["cfg"], r["eap"], r["ext"], r["mem"]
    heads = cfg.n_layers * cfg.n_heads
    t_store, t_online = r["t_store"], r["t_online"]
    rows1 = [
        [f"store: attribution_patching, all {heads} heads", r["t_atp"], r["t_atp"] / t_store],
        [f"store: edge_attribution, all {e['S']} x {e['R']} sender x receiver pairs", r["t_eap"], r["t_eap"] / t_store],
        ["store: AtP + EAP", t_store, 1.0],
        ["online: AtP + EAP (corrupt fwd, clean fwd + bwd with hooks, products)", t_online, t_online / t_store],
        ["online: the same plus loading the model", t_online + r["t_load"], (t_online + r["t_load"]) / t_store],
    ]  # fmt: skip
    gb, n_seq_flops = r["gemm_big"], r["shape"][0]
    edge_gf, blocked_gf, dense_gf = (2 * r[k] / 1e9 for k in ("macs_edges", "macs_blocked", "macs_dense"))
    ach, ach_c = edge_gf / r["t_eap"], blocked_gf / r["t_eap"]
    prod = blocked_gf / n_seq_flops / e["product"]
    dense = dense_gf / n_seq_flops / e["dense"]
    chunk = blocked_gf / n_seq_flops / e["chunk"]
    rows2 = [
        ["real edges' products (sender before receiver; tokens x d_model x edges)", edge_gf, "", ""],
        ["products computed (8 lower-triangular receiver blocks)", blocked_gf, "", ""],
        ["products of the full sender x receiver matrix", dense_gf, "", ""],
        ["numpy GEMM, 2048^3 float32", "", gb, 1.0],
        [f"numpy GEMM, EAP's full shape ({e['S']} x {e['K']}) @ ({e['K']} x {e['R']})", "", r["gemm_same"],
         r["gemm_same"] / gb],
        ["edge_attribution end to end: real edges' FLOPs / its time", edge_gf, ach, ach / gb],
        ["edge_attribution end to end: computed FLOPs / its time", blocked_gf, ach_c, ach_c / gb],
        ["its compute alone (one chunk in memory): computed FLOPs / time", "", chunk, chunk / gb],
        ["its blocked products alone, one sequence", "", prod, prod / gb],
        ["the full (unblocked) product, one sequence", "", dense, dense / gb],
    ]  # fmt: skip
    seq = e["chunk"]
    rows2b = [[name, e[key] * 1e3, e[key] / seq] for name, key in
              (("senders (deltas, z @ W_O, derived MLP outputs)", "senders"),
               ("receivers (W_Q/W_K/W_V @ grads, through ln1)", "receivers"),
               ("product (sender x receiver GEMMs, blocked)", "product"),
               ("the same product unblocked (full matrix, before this bench)", "dense"),
               ("all of _chunk_scores", "chunk"))]  # fmt: skip
    mb = 2**20
    small, big = mem["small"], mem["big"]
    rows3 = [
        [f"{n_seq} sequences ({r['n_tok']} tokens)", r["disk"]["small"] / mb, small["base"] / mb, small["peak"] / mb,
         small["seconds"]],
        [f"{n_seq * args.mem_factor} sequences ({r['big_tok']} tokens)", r["disk"]["big"] / mb, big["base"] / mb,
         big["peak"] / mb, big["seconds"]],
    ]  # fmt: skip
    f, b = ext["fill"], ext["bytes"]
    rows4 = [[k, ext["total"][k], f[k], f[k] / f["default"], b[k]] for k in f]
    rows4.append(["of which gradients", "", "", "", b.get("of which gradients", "")])
    t1 = C.table(["method", "seconds", "x store AtP+EAP"], rows1)
    t2 = C.table(["", "GFLOP", "GFLOP/s", "x GEMM 2048^3"], rows2)
    t2b = C.table(["part of EAP, per sequence", "ms", "x _chunk_scores"], rows2b)
    t3 = C.table(["store-based AtP + EAP", "clean store MiB", "RSS before MiB", "peak RSS MiB", "seconds"], rows3)
    t4 = C.table(["extraction (ioi)", "seconds (incl. load)", "fill s", "fill x default", "B/token"], rows4)
    mem_ratio = big["peak"] / small["peak"]
    grad_x = f["default --grad"] / f["default+resid_pre"]
    for t in (t1, t2, t2b, t3, t4):
        print(t, end="\n\n")
    print(f"online / store: {t_online / t_store:.1f}x; max rel diff AtP {r['err_atp']:.1e}, EAP {r['err_eap']:.1e}; "
          f"EAP at {ach:.2f} GFLOP/s (real edges) = {ach / r['gemm_big']:.1%} of GEMM; peak x{mem_ratio:.2f} over "
          f"{args.mem_factor}x the sequences; --grad fill x{grad_x:.2f}")  # fmt: skip
    cmd = "python bench/attribution.py" + (" --quick" if args.quick else "")
    body = f"""## (j) Attribution from the store (AtP, EAP) vs the online method

Command: `{cmd}`, run {time.strftime("%Y-%m-%d %H:%M", time.gmtime())} UTC — machine: {C.machine()}; `uptime` load
average at the start {LOAD0}.
Model `{model}` ({cfg.n_layers} layers x {cfg.n_heads} heads, {cfg.n_key_value_heads} kv heads), data `ioi`
(clean, `--grad {METRIC}`) and `ioi-abc` (corrupt), {r["shape"][0]} sequences x {r["shape"][1]} tokens, batch
(chunk) {bs}, float32 storage. Every time is the fastest of {
        repeat
    } run(s) (after one warm-up run where timed with `timeit`).

### 1. Store-based AtP + EAP vs the online method, same tokens

{t1}

The online method loads the bridge, and per batch runs the corrupt forward pass and the clean forward and backward
pass with TransformerLens hooks (`use_split_qkv_input`, `use_hook_mlp_in`, `use_attn_result`; gradients at
`hook_z`, `hook_q/k/v_input`, `hook_mlp_in` and the final residual), then the same products. They agree with the
store's: max relative difference **{r["err_atp"]:.1e}** (AtP scores) and **{r["err_eap"]:.1e}** (EAP, every edge).

### 2. EAP against the FLOPs of its edge products

{t2}

{t2b}

EAP computes, per sequence, the senders' deltas (S = {e["S"]}: `input`, every head's `z @ W_O`, every derived MLP
output) and the receivers' input gradients (R = {e["R"]}: every head's q/k/v input through ln1, every MLP input,
the logits), each (pos x d_model), then their products over positions and d_model as GEMMs. The edges are
lower-triangular (a sender writes before its receiver reads), so the analyzer multiplies 8 runs of consecutive
receivers by only the senders they need: {blocked_gf / dense_gf:.0%} of the full matrix's FLOPs, {
        blocked_gf / edge_gf:.2f}x the real edges' (the blocked product took {
        e["product"] / e["dense"]:.2f}x the full one's time here).
Of its compute on one chunk in memory, the products are {e["product"] / seq:.0%}, the receivers
{e["receivers"] / seq:.0%} (15 small `(pos x d_head) @ (d_head x d_model)` GEMMs per layer, then ln1's Jacobian)
and the senders {e["senders"] / seq:.0%}; end to end it runs at {ach_c / chunk:.0%} of its in-memory compute rate
(the rest: reading, checksumming and casting the activations and
gradients from the two stores, and dask's graph).

### 3. Peak memory over {args.mem_factor}x the sequences (one fresh process per size)

{t3}

Peak RSS grows **{mem_ratio:.2f}x** for {args.mem_factor}x the sequences.

### 4. Extraction with `--grad` vs without (same model, same prompts)

{t4}

`--grad` costs **{grad_x:.2f}x** the fill time of the same extraction without gradients (default + resid_pre,
which `--grad` adds), {f["default --grad"] / f["default"]:.2f}x that of the default fields.
"""
    C.write_section("attribution", body)


LOAD0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())

if __name__ == "__main__":
    main()
