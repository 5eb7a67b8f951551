"""Shared helpers of the benchmarks: machine description, timing, cached stores, the seed's online
copy-suppression method (one hooked forward pass per head), and writing a section of
docs/benchmarks.md. Each bench prints its figures and replaces its own section of that file."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"
CACHE = Path(os.environ.get("HEADSTORE_BENCH_CACHE", Path.home() / ".cache" / "headstore-bench"))

HEADER = """# headstore benchmarks

Every figure below was measured by the script named in its section (`python bench/NAME.py`, add
`--quick` for a smaller run); ratios are taken side by side in one run on one machine. Each script
rewrites its own section, so this file always shows the latest run of each.
"""


def machine() -> str:
    """One line: CPU, cores, memory, accelerator, Python, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, IndexError):
        pass
    import torch

    acc = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU only)"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} usable cores{mem}, {acc}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f} at "
        "the end of the run" + (SHARED if os.getloadavg()[0] > len(os.sched_getaffinity(0)) + 0.5 else "")
    )


SHARED = " (other jobs shared the machine: absolute times are inflated, ratios are side by side)"


def timeit(
    fn: Callable[[], Any], repeat: int = 3, warmup: int = 1, stat: Callable[[list[float]], float] = statistics.median
) -> float:
    """``stat`` (median; ``min`` for the fastest) of the wall seconds of ``fn()`` over ``repeat`` runs after
    ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times)


def store(model: str, data: str, n_seq: int, batch_size: int, *, fields: tuple[str, ...] = ("default",), dtype: str = "float32",
          seq_len: int | None = None, device: str = "cpu", layout: str | None = None,
          grad: str | None = None) -> Path:  # fmt: skip
    """A store under the bench cache, extracted on first use (same arguments -> same folder).
    ``layout``: "sharded" or "chunked" (None: extract's default; the folder name then omits it).
    ``grad``: a metric whose gradients to store (``extract --grad``; None: none, and the folder name omits it)."""
    from headstore.extract import ExtractRequest, extract

    tag = f"{model}-{data.replace(':', '_')}-n{n_seq}-b{batch_size}-{'+'.join(fields)}-{dtype}-L{seq_len}"
    tag += "" if layout is None else f"-{layout}"
    tag += "" if grad is None else "-grad_" + re.sub(r"[^A-Za-z0-9_.-]", "_", grad)
    out = CACHE / f"{tag}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    if _complete(out):  # made before (an older schema included: extract would refuse to resume it, and it reads)
        return out
    kw: dict[str, Any] = {} if layout is None else {"layout": layout}
    if grad is not None:
        kw["grad"] = grad
    extract(ExtractRequest(model=model, data=data, out=str(out), fields=fields, dtype=dtype, n_seq=n_seq,
                           batch_size=batch_size, seq_len=seq_len, device=device, progress=False, **kw))  # fmt: skip
    return out


def _complete(path: Path) -> bool:
    """``path`` is a store whose every sequence is written."""
    if not (path / "zarr.json").exists():
        return False
    from headstore.store_schema import HeadstoreError, open_store

    try:
        open_store(path)
    except HeadstoreError:
        return False
    return True


def plain_forward(bridge: Any, toks: np.ndarray, batch_size: int) -> None:
    """One ordinary forward pass (logits only, no hooks) over ``toks`` in batches: the model's own ``o_proj``, with
    the bridge's per-head result sums (``use_attn_result``, 3-7 % of a SmolLM2 forward) off for the call."""
    import torch

    from headstore.extract.families import attn_result

    with attn_result(bridge, False), torch.inference_mode():
        for s in range(0, toks.shape[0], batch_size):
            x = torch.as_tensor(toks[s : s + batch_size], dtype=torch.long, device=bridge.cfg.device)
            bridge(x, return_type="logits")


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall times cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote section {name!r} of {DOC}")


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --- the seed's method (000, Part 1: compute_weighted_avg_logit_suppression, return_new_loss=False) ----
# One hooked forward pass of the whole model per head, exactly as the seed does it.


def _hook_v(v: Any, hook: Any, ctx: dict[str, Any], kv_idx: int) -> None:
    ctx["v"] = v[:, :, kv_idx]


def _hook_pattern(pattern: Any, hook: Any, ctx: dict[str, Any], head_idx: int) -> None:
    ctx["pattern"] = pattern[:, head_idx]


def _hook_result(result: Any, hook: Any, ctx: dict[str, Any], toks: Any, model: Any, layer: int, head_idx: int) -> None:
    import einops

    v = ctx.pop("v")
    unembeddings = model.W_U.T[toks]
    result_pre_attn = einops.einsum(
        v, model.W_O[layer, head_idx], "batch seqK d_head, d_head d_model -> batch seqK d_model"
    )
    ctx["coeffs"] = einops.einsum(result_pre_attn, unembeddings, "batch seqK d_model, batch seqK d_model -> batch seqK")


def _hook_scale(ln_scale: Any, hook: Any, ctx: dict[str, Any], toks: Any, bos: int) -> None:
    import einops

    coeffs, pattern = ctx.pop("coeffs"), ctx.pop("pattern")
    nb = (toks != bos).float()
    non_bos_attn = pattern * einops.einsum(nb, nb, "batch seqQ, batch seqK -> batch seqQ seqK")
    per_src_attn = einops.reduce(non_bos_attn, "batch seqQ seqK -> batch seqK", "sum")
    per_src = einops.reduce(
        einops.einsum(coeffs, non_bos_attn, "batch seqK, batch seqQ seqK -> batch seqQ seqK") / ln_scale,
        "batch seqQ seqK -> batch seqK",
        "sum",
    )
    per_seq = einops.einsum(per_src, per_src_attn, "batch seqK, batch seqK -> batch") / per_src_attn.sum(dim=-1)
    ctx["out"] = {"per_position": per_src, "per_sequence": per_seq}


def online_copy_suppression(bridge: Any, toks_np: np.ndarray, layer: int, head_idx: int) -> dict[str, np.ndarray]:
    """The seed's per-head method on the live bridge: one forward pass with four hooks."""
    import torch

    toks = torch.as_tensor(toks_np, dtype=torch.long, device=bridge.cfg.device)
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    ctx: dict[str, Any] = {}
    hooks = [
        (f"blocks.{layer}.attn.hook_v", partial(_hook_v, ctx=ctx, kv_idx=head_idx // (cfg.n_heads // n_kv))),
        (f"blocks.{layer}.attn.hook_pattern", partial(_hook_pattern, ctx=ctx, head_idx=head_idx)),
        (f"blocks.{layer}.attn.hook_result",
         partial(_hook_result, ctx=ctx, toks=toks, model=bridge, layer=layer, head_idx=head_idx)),
        ("ln_final.hook_scale", partial(_hook_scale, ctx=ctx, toks=toks, bos=bridge.tokenizer.bos_token_id)),
    ]  # fmt: skip
    with torch.no_grad():
        bridge.run_with_hooks(toks, return_type="logits", fwd_hooks=hooks)
    return {k: t.detach().cpu().numpy() for k, t in ctx["out"].items()}
