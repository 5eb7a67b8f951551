"""One forward pass per batch, every requested hook written to the store as it goes.

Batches are written by a background worker while the next batch runs through the model; a batch
is marked done in the manifest only after all its arrays are written, so a rerun of the same
command resumes where a crash left off.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import functools
import hashlib
import importlib.metadata
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from headstore.extract.compact import check_pattern_derivable, derives_pattern
from headstore.extract.data import DataRequest, TokenDataset, build_dataset
from headstore.extract.families import resolve_fields, run_hooked
from headstore.extract.models import LoadedModel, load_model
from headstore.extract.plan import Plan, check_space, disk_full, plan_extract
from headstore.extract.weights import collect_weights, effective_embedding, vocab_strings, weights_sha256
from headstore.store_schema import (
    FIELDS,
    HeadstoreError,
    Provenance,
    StoreWriter,
    create_store,
    done_mask,
    parse_fields,
    read_provenance,
)
from headstore.store_schema.io import store_sizes
from headstore.store_schema.layout import LAYOUTS, SCHEMA_VERSION, STORAGE_DTYPES
from headstore.store_schema.weights_store import SHARED, ensure_weights_store, relative_ref


@dataclass(frozen=True)
class ExtractRequest:
    model: str
    data: str
    out: str
    fields: str = "default"
    layers: str = "all"
    pattern_layers: str = "all"
    seq_len: int | None = None
    batch_size: int = 8
    n_seq: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    model_dtype: str = "float32"  # what the model runs in: float32, bfloat16 (as GPU jobs run) or float16
    seed: int = 0
    prepend_bos: bool = True
    shard: str = "0/1"
    progress: bool = True
    layout: str = "sharded"
    weights: str | None = None  # a shared weights store to create or reuse (W_E, W_EE, W_U, ...)
    dry_run: bool = False  # plan only (bytes, files, time from one timed batch): nothing written
    ignore_space: bool = False  # start even when the target has less free space than the plan


@dataclass(frozen=True)
class ExtractResult:
    """What one ``extract`` call did; times in wall seconds.

    ``setup_seconds``: model load, dataset, weights and store creation (once per store);
    ``fill_seconds``: the batch loop (forward passes, overlapped writes); ``write_wait_seconds``:
    the part of it the forward loop spent waiting for the background writer; ``fill_cpu_seconds``:
    the process's CPU time over the batch loop, every thread included; ``fill_system_seconds``: the kernel's
    part of it (page-cache writes, page faults).
    """

    path: str
    n_sequences: int
    written: int
    skipped: int
    setup_seconds: float
    fill_seconds: float
    write_wait_seconds: float
    fill_cpu_seconds: float
    n_tokens_written: int
    plan: Plan | None = None  # what the store takes (bytes, files); the only output of a dry run
    fill_system_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.fill_seconds


def parse_layers(spec: str, n_layers: int, option: str = "--layers") -> tuple[int, ...]:
    """``all`` | ``0,3,5`` | ``2-5``; ``option`` names the flag in errors."""
    if spec in ("all", ""):
        return tuple(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError as e:
        raise HeadstoreError(f"{option} {spec!r} is not 'all', a list like 0,3,5 or a range like 2-5") from e
    bad = sorted(x for x in out if not 0 <= x < n_layers)
    if bad:
        raise HeadstoreError(f"{option} names {bad} but the model has layers 0..{n_layers - 1}")
    return tuple(sorted(out))


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise HeadstoreError(f"--shard {spec!r} must look like i/N (e.g. 0/2)") from e
    if n < 1 or not 0 <= i < n:
        raise HeadstoreError(f"--shard {spec!r} needs 0 <= i < N")
    return i, n


def hook_names(
    fields: Sequence[str],
    layers: Sequence[int],
    n_layers: int,
    rotary: bool,
    pattern_layers: Sequence[int] | None = None,
) -> dict[str, list[str]]:
    """Field -> the hook names to read (one per layer for per-layer fields; ``pattern`` only for
    ``pattern_layers`` when given)."""
    out: dict[str, list[str]] = {}
    for name in fields:
        hook = FIELDS[name].hook
        if not hook:
            continue
        hook = hook.replace("{rot_}", "rot_" if rotary else "").replace("{last}", str(n_layers - 1))
        per = pattern_layers if name == "pattern" and pattern_layers is not None else layers
        out[name] = [hook.replace("{L}", str(L)) for L in per] if "{L}" in hook else [hook]
    return out


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("headstore", "torch", "transformer-lens", "transformers", "zarr", "numcodecs", "xarray", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


def _tokenizer_info(tok: Any) -> dict[str, Any]:
    vocab = tok.get_vocab()
    h = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    return {
        "name": str(getattr(tok, "name_or_path", "")).split("/")[-1],
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "vocab_sha256": h.hexdigest(),
    }


def _check_out(out: Path) -> Provenance | None:
    """The existing store's provenance, None if nothing is there; refuse anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise HeadstoreError(f"--out {out} is a file, not a store: choose a new path")
    if not any(out.iterdir()):
        raise HeadstoreError(f"--out {out} is an empty folder: remove it or choose a new path")
    if not (out / "zarr.json").exists():
        raise HeadstoreError(f"--out {out} is a folder that is not a Zarr v3 store: choose a new path")
    return read_provenance(out)


def _quiet_hf_loading() -> None:
    """transformers' "Loading weights" bars go to stderr and would bury a one-line error: silence them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def extract(req: ExtractRequest) -> ExtractResult:
    """Run ``req.model`` over ``req.data`` once and fill (or resume) the store at ``req.out``."""
    t0 = time.perf_counter()
    fields = parse_fields(req.fields)
    if req.dtype not in STORAGE_DTYPES:
        raise HeadstoreError(f"--dtype {req.dtype!r}: choose float32 or float16")
    if req.batch_size <= 0:
        raise HeadstoreError(f"--batch-size must be positive, got {req.batch_size}")
    if req.layout not in LAYOUTS:
        raise HeadstoreError(f"--layout {req.layout!r}: choose {' or '.join(LAYOUTS)}")
    shard_i, shard_n = parse_shard(req.shard)
    out = Path(req.out)
    existing = _check_out(out)
    _quiet_hf_loading()
    model = load_model(req.model, req.device, req.model_dtype)
    fields = resolve_fields(req.fields, fields, model)  # less what this family cannot represent
    cfg = model.config_dict()
    layers = parse_layers(req.layers, cfg["n_layers"])
    pattern_layers = _parse_pattern_layers(req.pattern_layers, cfg["n_layers"], layers, fields)
    data_req = DataRequest(req.data, req.n_seq, req.seq_len, req.seed, req.prepend_bos)
    ds = build_dataset(data_req, model.tokenizer, cfg["n_ctx"])
    seq_len = int(ds.tokens.shape[1])
    weights = collect_weights(model, layers, seq_len)
    prov = Provenance(
        schema_version=SCHEMA_VERSION,
        model={
            "name": req.model,
            "source": model.source,
            "config": cfg,
            "processing": dict(model.processing),
            "dtype": req.model_dtype,
            "weights_sha256": weights_sha256(weights),
        },
        tokenizer=_tokenizer_info(model.tokenizer),
        dataset=ds.describe(),
        prepend_bos=req.prepend_bos,
        seq_len=seq_len,
        storage_dtype=req.dtype,
        fields=fields,
        layers=layers,
        batch_size=req.batch_size,
        pattern_layers=pattern_layers,
        layout=req.layout,
        versions=_versions(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    if existing is not None:
        existing.check_same_run(prov)
    starts = list(range(0, ds.tokens.shape[0], req.batch_size))
    per = -(-len(starts) // shard_n)
    hooks = hook_names(prov.fields, prov.layers, prov.config["n_layers"], model.rotary, prov.pattern_layers)
    plan = plan_extract(out, prov, ds, model, weights, req.weights, existing is not None,
                        starts[shard_i * per : (shard_i + 1) * per], hooks if req.dry_run else None)  # fmt: skip
    if req.dry_run:
        return ExtractResult(str(out), ds.tokens.shape[0], 0, 0, time.perf_counter() - t0, 0.0, 0.0, 0.0, 0, plan)
    if not req.ignore_space:
        check_space(plan)
    try:
        if existing is None:
            if derives_pattern(fields):  # compact store: refuse a model whose pattern open_store cannot derive
                check_pattern_derivable(model, ds.tokens, layers)
            _create(out, prov, ds, model, weights, req.weights)
        res = _fill(out, model, ds, prov, shard_i, shard_n, req.progress, time.perf_counter() - t0)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full(out, ds.tokens.shape[0], req.batch_size) from None
    return dataclasses.replace(res, plan=plan)


def _parse_pattern_layers(
    spec: str, n_layers: int, layers: tuple[int, ...], fields: tuple[str, ...]
) -> tuple[int, ...] | None:
    """``--pattern-layers``: the extracted layers whose pattern is stored (None without a pattern)."""
    chosen = layers if spec in ("all", "") else parse_layers(spec, n_layers, "--pattern-layers")
    if "pattern" not in fields:
        if chosen != layers:
            raise HeadstoreError(f"--pattern-layers {spec!r} needs pattern among the --fields")
        return None
    extra = sorted(set(chosen) - set(layers))
    if extra:
        raise HeadstoreError(f"--pattern-layers names {extra} but --layers extracts only {list(layers)}")
    return chosen


def _create(
    out: Path,
    prov: Provenance,
    ds: TokenDataset,
    model: LoadedModel,
    weights: dict[str, np.ndarray],
    shared_dir: str | None = None,
) -> None:
    """Create the store; with ``shared_dir`` the model-wide weights go to (or come from) that weights store."""
    weights = dict(weights)
    weights["vocab"] = vocab_strings(model.tokenizer, prov.config["d_vocab"])
    if shared_dir is None:
        if 0 in prov.layers:
            weights["W_EE"] = effective_embedding(model)
    else:
        shared = {k: weights.pop(k) for k in SHARED if k in weights}
        model_info = {"name": prov.model["name"], "weights_sha256": prov.model["weights_sha256"]}
        sha = ensure_weights_store(shared_dir, shared, lambda: {"W_EE": effective_embedding(model)}, model_info)
        taken = sorted([*shared, *(["W_EE"] if 0 in prov.layers else [])])
        ref = {"path": relative_ref(out, shared_dir), "sha256": sha, "arrays": taken}
        prov = dataclasses.replace(prov, weights_store=ref)
    sizes = store_sizes(prov.config, prov, ds.tokens.shape[0])
    try:
        create_store(out, prov, sizes, ds.tokens, ds.columns, weights)
    except HeadstoreError:
        # Another shard process created it first: resume into it if it is the same run.
        if not out.exists():
            raise
        read_provenance(out).check_same_run(prov)


def _fill(
    out: Path,
    model: LoadedModel,
    ds: TokenDataset,
    prov: Provenance,
    shard_i: int,
    shard_n: int,
    progress: bool,
    setup_seconds: float,
) -> ExtractResult:
    t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system
    n = ds.tokens.shape[0]
    bs = prov.batch_size
    starts = list(range(0, n, bs))
    per = -(-len(starts) // shard_n)
    mine = starts[shard_i * per : (shard_i + 1) * per]
    done = done_mask(out)
    todo = [s for s in mine if not done[s : s + bs].all()]
    hooks = hook_names(prov.fields, prov.layers, prov.config["n_layers"], model.rotary, prov.pattern_layers)
    writer = StoreWriter(out)
    bar = tqdm(
        total=sum(min(bs, n - s) * prov.seq_len for s in todo),
        unit="tok",
        unit_scale=True,
        desc=f"extract {out.name}",
        disable=not progress,
    )
    pending: Future[None] | None = None
    buffers = HostBuffers()
    waited, n_tok = 0.0, 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="headstore-writer") as pool:
        for start in todo:
            toks = ds.tokens[start : start + bs]
            buffers.next_batch()
            batch = run_batch(model, toks, prov, hooks, buffers)
            if pending is not None:
                tw = time.perf_counter()
                pending.result()  # at most one batch in flight: memory bounded by two batches
                waited += time.perf_counter() - tw
            pending = pool.submit(lambda s, b: writer.write_batch(s, b.arrays()), start, batch)
            bar.update(toks.size)
            n_tok += toks.size
        if pending is not None:
            tw = time.perf_counter()
            pending.result()
            waited += time.perf_counter() - tw
    bar.close()
    return ExtractResult(
        str(out), n, len(todo), len(mine) - len(todo), setup_seconds, time.perf_counter() - t0, waited,
        time.process_time() - c0, n_tok, fill_system_seconds=os.times().system - k0,
    )  # fmt: skip


class HostBatch:
    """One batch's fields on their way to host memory; ``arrays()`` waits for the copies to land.

    On CUDA the device-to-host copies are issued on a side stream into pinned memory, so the next
    batch's forward pass runs while they complete; the writer thread waits on ``done``. On CPU the
    tensors are host tensors already and ``done`` is None.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], dev: torch.device) -> None:
        self.done: torch.cuda.Event | None = None
        if dev.type != "cuda":
            self.tensors = tensors
            return
        side = _copy_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))  # the copies start after the forward that made them
        self.tensors = {}
        with torch.cuda.stream(side):
            for name, t in tensors.items():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(side)  # the caching allocator must not reuse t's memory before the copy ran
                self.tensors[name] = host
            self.done = torch.cuda.Event()
            self.done.record(side)

    def arrays(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return {name: t.numpy() for name, t in self.tensors.items()}


@functools.cache
def _copy_stream(dev: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(dev)


class HostBuffers:
    """The per-layer fields' output tensors on the CPU, reused every other batch.

    Stacking a batch's layers into a fresh tensor faults in new pages each batch (30 layers of SmolLM2
    patterns, 141 MB: 55 ms fresh, 12 ms into a reused tensor). Two sets suffice: the writer holds batch k's
    arrays while batch k+1 fills the other set, and ``_fill`` waits for batch k's write before batch k+2
    starts. On a GPU every batch takes fresh device memory from torch's caching allocator (cheap) and
    ``HostBatch`` copies it out.
    """

    def __init__(self) -> None:
        self.sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        self.turn = 0

    def next_batch(self) -> None:
        self.turn ^= 1

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        held = self.sets[self.turn]
        t = held.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            t = held[name] = torch.empty(shape, dtype=dtype)
        return t


def check_float16(name: str, layer: int | None, t: torch.Tensor) -> None:
    """Refuse a finite value of ``t`` that float16 cannot hold: float16 holds bfloat16's values exactly up to
    65504, and a value beyond is named by field, layer and magnitude, never stored as inf. inf/NaN the model
    itself made are stored as they are. One min/max pass when all is finite."""
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)) and max(-float(lo), float(hi)) <= 65504:
        return
    fine = torch.isfinite(t)
    if not bool((fine & ~torch.isfinite(t.to(torch.float16))).any()):
        return  # beyond 65504 but rounds to it, or inf/NaN of the model's own
    big = float(t.float().abs().masked_fill(~fine, 0).max())
    where = "" if layer is None else f" at layer {layer}"
    raise HeadstoreError(
        f"{name}{where} reaches {big:.4g}, beyond float16's 65504: extract with --dtype float32 "
        "(a new --out) to store it"
    )


def next_token_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """loss[batch, pos] = -log softmax(logits[batch, pos])[x[batch, pos + 1]], NaN at the last position. A
    sequence at a time: one log-softmax over a whole batch's logits maps and faults in ~200 MB each batch
    (SmolLM2, 8 x 128 tokens: 93 ms vs 35-58 ms, same values)."""
    loss = torch.full(x.shape, float("nan"), device=x.device)
    for b in range(x.shape[0]):
        logp = torch.log_softmax(logits[b, :-1].float(), dim=-1)
        loss[b, :-1] = -logp.gather(-1, x[b, 1:, None])[:, 0]
    return loss


@torch.inference_mode()
def run_batch(
    model: LoadedModel,
    toks: np.ndarray,
    prov: Provenance,
    hooks: dict[str, list[str]],
    buffers: HostBuffers | None = None,
) -> HostBatch:
    """One forward pass; returns its fields in storage layout, copying to host (see HostBatch). Each hook's tensor
    is copied, in its storage dtype, into its layer of the field's tensor in ``buffers`` as it fires."""
    buffers = buffers or HostBuffers()
    x = torch.as_tensor(toks, dtype=torch.long, device=model.bridge.cfg.device)
    where: dict[str, list[tuple[str, int]]] = {}  # hook name -> (field, index of its layer) for each field it feeds
    for name, hs in hooks.items():
        for i, h in enumerate(hs):
            where.setdefault(h, []).append((name, i))
    tensors: dict[str, torch.Tensor] = {}
    fired: set[str] = set()

    def take(hook: str, t: torch.Tensor) -> None:
        fired.add(hook)
        for name, i in where[hook]:
            field = FIELDS[name]
            value = t[..., 0] if name.endswith("_scale") else t
            f16 = field.dtype == "storage" and prov.storage_dtype == "float16"
            if f16:
                check_float16(name, _stored_layer(name, i, prov) if field.per_layer else None, value)
            if name not in tensors:  # (batch, layer, ...) per-layer fields; pattern is (batch, layer, head, q, k)
                shape = (value.shape[0], len(hooks[name]), *value.shape[1:]) if field.per_layer else tuple(value.shape)
                tensors[name] = buffers.take(name, shape, torch.float16 if f16 else torch.float32, x.device)
            (tensors[name][:, i] if field.per_layer else tensors[name]).copy_(value)

    logits = run_hooked(model, x, list(where), take)  # hooks the bridge lacks computed from what it has
    missing = sorted(set(where) - fired)
    if missing:  # a buffer's layer would hold another batch's values
        raise HeadstoreError(f"hooks {missing[:3]} did not fire in {model.name}'s forward pass: cannot extract them")
    tensors = {name: tensors[name] for name in hooks}  # the fields' order, not the hooks' firing order
    for name, t in tensors.items():
        assert t.ndim == len(FIELDS[name].dims), (name, t.shape, FIELDS[name].dims)
    if "loss" in prov.fields:
        tensors["loss"] = next_token_nll(logits, x)
    return HostBatch(tensors, x.device)


def _stored_layer(name: str, i: int, prov: Provenance) -> int:
    """The model layer of the i-th stored layer of a per-layer field."""
    return (prov.stored_pattern_layers if name == "pattern" else prov.layers)[i]
