"""One forward pass per batch, every requested hook written to the store as it goes.

Batches are written by a background worker while the next batch runs through the model; a batch
is marked done in the manifest only after all its arrays are written, so a rerun of the same
command resumes where a crash left off.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from headstore.extract.auto import auto_fields
from headstore.extract.batch import HostBatch, HostBuffers, hook_names, run_batch
from headstore.extract.compact import settle_derived
from headstore.extract.data import DataRequest, TokenDataset, build_dataset
from headstore.extract.families import resolve_fields
from headstore.extract.grad import check_grad, parse_metric, targets_for, with_grad_fields
from headstore.extract.grad_ig import check_corrupt
from headstore.extract.models import LoadedModel, load_model
from headstore.extract.plan import Plan, plan_extract
from headstore.extract.plan_config import config_only, plan_from_config
from headstore.extract.request import ExtractRequest, Layers, resolve_layers
from headstore.extract.space import check_space, disk_full
from headstore.extract.weights import collect_weights, effective_embedding, vocab_strings, weights_sha256
from headstore.store_schema import (
    HeadstoreError,
    Provenance,
    StoreWriter,
    create_store,
    done_mask,
    read_provenance,
)
from headstore.store_schema.arrays import store_sizes
from headstore.store_schema.layout import SCHEMA_VERSION, SHARED, derived_fields
from headstore.store_schema.paths import relative_ref
from headstore.store_schema.provenance import ModelConfig
from headstore.store_schema.provenance_parts import ModelInfo, TokenizerInfo, WeightsRef
from headstore.store_schema.write.weights import ensure_weights_store


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


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("headstore", "torch", "transformer-lens", "transformers", "zarr", "numcodecs", "xarray", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


def _tokenizer_info(tok: Any) -> TokenizerInfo:
    vocab = tok.get_vocab()
    h = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    return TokenizerInfo(
        name=str(getattr(tok, "name_or_path", "")).split("/")[-1],
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        vocab_size=len(tok),
        vocab_sha256=h.hexdigest(),
    )


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
    config = config_only(req.model) if req.dry_run else None
    if config is not None:  # a plan from the model's config.json alone: nothing loaded, read or written
        n = req.n_sequences() or 0
        return ExtractResult(
            req.out, n, 0, 0, time.perf_counter() - t0, 0.0, 0.0, 0.0, 0, plan_from_config(req, config)
        )
    lacking = req.missing_inputs()
    if lacking is not None:
        raise HeadstoreError(f"extract needs {lacking} (only a --dry-run on a model's config.json alone goes without)")
    out = Path(req.out)
    existing = _check_out(out)
    _quiet_hf_loading()
    model = load_model(req.model, req.device, req.model_dtype)
    prov, ds, weights, bad = _describe(req, model)
    if existing is not None:
        existing.check_same_run(prov)
    mine = my_batches(ds.tokens.shape[0], req.batch_size, req.shard)
    hooks = hook_names(prov.fields, prov.layers, prov.config["n_layers"], model.rotary, prov.pattern_layers)
    plan = plan_extract(out, prov, ds, model, weights, req.weights, existing is not None, mine,
                        hooks if req.dry_run else None, bad)  # fmt: skip
    if req.dry_run:
        return ExtractResult(str(out), ds.tokens.shape[0], 0, 0, time.perf_counter() - t0, 0.0, 0.0, 0.0, 0, plan)
    if not req.ignore_space:
        check_space(plan)
    try:
        if existing is None:
            _create(out, prov, ds, model, weights, req.weights)
        res = _fill(out, model, ds, prov, mine, hooks, req.progress, time.perf_counter() - t0, bad)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full(out, ds.tokens.shape[0], req.batch_size) from None
    return dataclasses.replace(res, plan=plan)


def write_batch(writer: StoreWriter, start: int, batch: HostBatch) -> None:
    """The writer thread's task: write the batch, then give its pinned buffers back for a later batch to reuse
    (after the write returns: ``StoreWriter.write_batch`` reads the arrays synchronously)."""
    try:
        writer.write_batch(start, batch.arrays())
    finally:
        batch.release()


def my_batches(n: int, batch_size: int, shard: tuple[int, int]) -> list[int]:
    """The first sequence of each batch that shard ``(index, count)`` fills: the index-th of count ranges."""
    starts = list(range(0, n, batch_size))
    i, count = shard
    per = -(-len(starts) // count)
    return starts[i * per : (i + 1) * per]


def _describe(
    req: ExtractRequest, model: LoadedModel
) -> tuple[Provenance, TokenDataset, dict[str, np.ndarray], np.ndarray | None]:
    """The store ``req`` makes with ``model``: its provenance, its dataset, the model's weights and, with
    ``--grad-ig``, the corrupt dataset's tokens."""
    metric = parse_metric(req.grad) if req.grad is not None else None  # --grad: its fields and resid_pre added
    ig = req.grad_ig is not None
    fields = resolve_fields(req.named_fields(), with_grad_fields(req.selected_fields(), metric, ig), model)
    cfg = model.config_dict()
    layers = resolve_layers("layers", req.layers, cfg["n_layers"])
    chosen = _pattern_layers(req, cfg["n_layers"], layers, fields)  # bad --pattern-layers refused before the data
    data_req = DataRequest(req.data, req.n_sequences(), req.seq_len, req.seed, req.prepend_bos)
    ds = build_dataset(data_req, model.tokenizer, cfg["n_ctx"])
    bad = None
    if ig:  # EAP-IG: the corrupt twin, built with the same options, of the same shape
        bad = build_dataset(dataclasses.replace(data_req, spec=str(req.corrupt)), model.tokenizer, cfg["n_ctx"])
    seq_len = int(ds.tokens.shape[1])
    fields = auto_fields(req.fields, req.drop, fields, ModelConfig.from_dict(cfg), seq_len,
                         chosen in (None, layers), tuple(model.unrepresentable))  # fmt: skip
    if not req.dry_run:  # what open_store will derive is checked against the live model (auto: else stored)
        fields = settle_derived(model, ds.tokens, layers, fields, "auto" in req.fields)
    pattern_layers = _pattern_layers(req, cfg["n_layers"], layers, fields)
    if metric is not None:  # the family, a missing column, a position outside a sequence: refused before any run
        check_grad(model, metric, ds)
    if bad is not None:
        check_corrupt(ds, bad, int(req.grad_ig or 0), model)
    weights = collect_weights(model, layers, seq_len)
    prov = Provenance(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            name=req.model,
            source=model.source,
            config=cfg,
            processing=dict(model.processing),
            dtype=req.model_dtype,
            weights_sha256=weights_sha256(weights),
        ),
        tokenizer=_tokenizer_info(model.tokenizer),
        dataset=ds.describe(),
        prepend_bos=req.prepend_bos,
        seq_len=seq_len,
        storage_dtype=req.dtype,
        fields=fields,
        derived=derived_fields(fields),
        layers=layers,
        batch_size=req.batch_size,
        pattern_layers=pattern_layers,
        layout=req.layout,
        versions=_versions(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        grad=None if metric is None else str(metric),
        grad_ig=req.grad_ig,
        corrupt=None if bad is None else bad.describe(),
    )
    return prov, ds, weights, None if bad is None else bad.tokens


def _pattern_layers(
    req: ExtractRequest, n_layers: int, layers: tuple[int, ...], fields: tuple[str, ...]
) -> tuple[int, ...] | None:
    """``pattern_layers``: the extracted layers whose pattern is stored (None without a pattern)."""
    spec = req.pattern_layers
    chosen = layers if spec == "all" else resolve_layers("pattern_layers", spec, n_layers)
    if "pattern" not in fields:
        if chosen != layers:
            raise HeadstoreError(f"--pattern-layers {_show(spec)!r} needs pattern among the --fields")
        return None
    extra = sorted(set(chosen) - set(layers))
    if extra:
        raise HeadstoreError(f"--pattern-layers names {extra} but --layers extracts only {list(layers)}")
    return chosen


def _show(layers: Layers) -> str:
    return layers if isinstance(layers, str) else ",".join(map(str, layers))


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
        model_info = {"name": prov.model.name, "weights_sha256": prov.model.weights_sha256}
        sha = ensure_weights_store(shared_dir, shared, lambda: {"W_EE": effective_embedding(model)}, model_info)
        taken = sorted([*shared, *(["W_EE"] if 0 in prov.layers else [])])
        ref = WeightsRef(path=relative_ref(out, shared_dir), sha256=sha, arrays=tuple(taken))
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
    mine: list[int],
    hooks: dict[str, list[str]],
    progress: bool,
    setup_seconds: float,
    corrupt: np.ndarray | None = None,
) -> ExtractResult:
    """Run and write the batches starting at ``mine`` that the manifest does not mark done."""
    t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system
    n = ds.tokens.shape[0]
    bs = prov.batch_size
    done = done_mask(out)
    todo = [s for s in mine if not done[s : s + bs].all()]
    writer = StoreWriter(out, prov)  # the provenance this run holds (created or checked the same run)
    bar = tqdm(
        total=sum(min(bs, n - s) * prov.seq_len for s in todo),
        unit="tok",
        unit_scale=True,
        desc=f"extract {out.name}",
        disable=not progress,
    )
    pending: Future[None] | None = None
    buffers = HostBuffers()
    targets = targets_for(prov, ds, corrupt)
    waited, n_tok = 0.0, 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="headstore-writer") as pool:
        for start in todo:
            toks = ds.tokens[start : start + bs]
            buffers.next_batch()
            grad = None if targets is None else targets.rows(start, start + bs)
            batch = run_batch(model, toks, prov, hooks, buffers, grad)
            if pending is not None:
                tw = time.perf_counter()
                pending.result()  # at most one batch in flight: memory bounded by two batches
                waited += time.perf_counter() - tw
            pending = pool.submit(write_batch, writer, start, batch)
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
