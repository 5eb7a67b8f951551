"""A plan before the run: bytes and files a store will take, and how long filling it should take.

``extract --dry-run`` measures one batch: it runs the model on the store's first batch (once to warm
up, once timed), encodes the arrays with the store's own codecs into an in-memory zarr store laid out
as the real one, and scales per-batch bytes to the whole dataset. Every real run also plans (without
the sample: raw bytes, ``pattern`` counted at its causal non-zero fraction, which is what LZ4 leaves)
and refuses to start when the target has less free space than the plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import MemoryStore

from headstore.store_schema import Provenance
from headstore.store_schema.arrays import field_dtype, store_layout
from headstore.store_schema.layout import ATTRS_KEY, FIELDS, MANIFEST
from headstore.store_schema.paths import is_local
from headstore.store_schema.shard_index import CRC_NBYTES, ENTRY_NBYTES
from headstore.store_schema.strings import stored_names
from headstore.store_schema.write.create import consolidate, create_arrays, write_columns, write_weights


@dataclass(frozen=True)
class FieldPlan:
    """One field: bytes per token and in all as written (encoded), files, and ``nbytes``: its values' raw size."""

    name: str
    bytes_per_token: float
    total_bytes: int
    files: int
    nbytes: int = 0

    def disk(self, block: int) -> int:
        """Bytes on disk: each file rounded up to the filesystem's ``block`` (files taken as equal in size)."""
        return self.files * block * -(-self.total_bytes // max(self.files * block, 1))


@dataclass(frozen=True)
class Plan:
    """What a store takes on disk (bytes and files) and, when measured, how long its batches take."""

    out: str
    n_tokens: int
    n_batches: int  # in the store
    todo_batches: int  # left to write by this process (resume, --shard)
    fields: tuple[FieldPlan, ...]
    weights_bytes: int  # weights written with the store (in it, and into a new --weights store)
    weights_files: int
    other_bytes: int  # tokens, columns, manifest, metadata
    other_files: int
    measured: bool  # field bytes from an encoded sample batch (dry run) or estimated (raw)
    seconds_per_batch: dict[str, float] = field(default_factory=dict)  # forward, encode (dry run)
    setup_seconds: float = 0.0
    creates: bool = True  # the store does not exist yet (weights, tokens, metadata still to write)
    block: int = 4096  # the target filesystem's block (disk use: every file rounded up to it)
    basis: str = ""  # how the field bytes were found, when not the two ways ``measured`` tells apart

    @property
    def total_bytes(self) -> int:
        return sum(f.total_bytes for f in self.fields) + self.weights_bytes + self.other_bytes

    @property
    def n_files(self) -> int:
        return sum(f.files for f in self.fields) + self.weights_files + self.other_files

    @property
    def bytes_needed(self) -> int:
        """What is still to be written: the batches left, and the rest when the store is new."""
        frac = self.todo_batches / max(self.n_batches, 1)  # (field metadata counted in full: small)
        rest = self.weights_bytes + self.other_bytes if self.creates else 0
        return int(sum(f.total_bytes for f in self.fields) * frac) + rest

    @property
    def files_needed(self) -> int:
        frac = self.todo_batches / max(self.n_batches, 1)
        rest = self.weights_files + self.other_files if self.creates else 0
        return int(sum(f.files for f in self.fields) * frac) + rest

    @property
    def estimated_seconds(self) -> float:
        """Set-up plus the batches left, forward and encode one after the other (2-core machines: the
        writer thread takes CPU from the forward pass; where it overlaps fully, the forward alone)."""
        return self.setup_seconds + self.todo_batches * sum(self.seconds_per_batch.values())

    def lines(self) -> list[str]:
        how = self.basis or ("measured on one encoded batch" if self.measured else "estimated from raw sizes")
        out = [f"plan for {self.out}: {self.n_tokens:,} tokens in {self.n_batches} batches ({how})"]
        for f in self.fields:
            out.append(
                f"  {f.name:<15} {f.bytes_per_token:>12,.1f} B/token {gb(f.total_bytes):>11}  {f.files:>7,} files"
                f"  {gb(f.disk(self.block)):>11} on disk"
            )
        out.append(f"  {'weights':<15} {'':>12}         {gb(self.weights_bytes):>11}  {self.weights_files:>7,} files")
        out.append(f"  {'other':<15} {'':>12}         {gb(self.other_bytes):>11}  {self.other_files:>7,} files"
                   "  (tokens, columns, manifest, metadata)")  # fmt: skip
        act = sum(f.total_bytes for f in self.fields)
        disk = sum(f.disk(self.block) for f in self.fields) + self.total_bytes - act
        out.append(
            f"  total {gb(self.total_bytes)} ({act / max(self.n_tokens, 1):,.0f} B/token of activations), "
            f"{self.n_files:,} files, {gb(disk)} on disk"
        )
        if self.seconds_per_batch:
            parts = ", ".join(f"{k} {v:.3g} s" for k, v in self.seconds_per_batch.items())
            out.append(
                f"  time: about {_duration(self.estimated_seconds)} ({self.todo_batches} batches x ({parts}) per batch"
                f" + set-up {self.setup_seconds:.1f} s)"
            )
        return out


def gb(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _compressed(arr: zarr.Array) -> bool:
    """Whether the array's chunks go through a compressor (not only bytes + crc32c)."""
    codecs = list(getattr(arr.metadata, "codecs", []))
    inner = list(getattr(codecs[0], "codecs", codecs)) if codecs else []
    return any(type(c).__name__ not in ("BytesCodec", "Crc32cCodec") for c in inner)


def _uncompressed_batch_bytes(arr: zarr.Array) -> int:
    """Bytes of one batch (``chunks[0]`` rows) of an uncompressed array: its inner chunks written whole, each
    with a crc32c, and each shard's index."""
    inner = math.prod(-(-n // c) for n, c in zip(arr.shape[1:], arr.chunks[1:], strict=True))
    values = inner * (math.prod(arr.chunks) * arr.dtype.itemsize + CRC_NBYTES)
    if arr.shards is None:
        return values
    return (
        values
        + ENTRY_NBYTES * inner
        + CRC_NBYTES * math.prod(-(-n // c) for n, c in zip(arr.shape[1:], arr.shards[1:], strict=True))
    )


def _grid(arr: zarr.Array) -> int:
    unit = arr.shards or arr.chunks
    return math.prod(-(-n // c) for n, c in zip(arr.shape, unit, strict=True))


def make_plan(
    out: str,
    prov: Provenance,
    sizes: Mapping[str, int],
    tokens: np.ndarray,
    columns: Mapping[str, np.ndarray],
    weights: Mapping[str, np.ndarray],
    shared: Mapping[str, np.ndarray] | None = None,
    todo_batches: int | None = None,
    sample: Mapping[str, np.ndarray] | None = None,
    creates: bool = True,
) -> Plan:
    """Lay the store out in memory as ``create_store`` would (metadata, tokens, columns, ``vocab``) and
    measure it; per-batch field bytes from ``sample`` (one batch, encoded) or from raw sizes.

    ``weights``: what the store itself holds (``W_EE`` included when it will); ``shared``: the arrays of
    a new ``--weights`` store (None: none to create). Float weights are uncompressed: their bytes are
    exact without encoding them (values + a 4-byte checksum per chunk + the shard index).
    """
    n, bs = tokens.shape[0], prov.batch_size
    n_batches = -(-n // bs)
    held: dict[str, Any] = {}  # key -> Buffer: what the in-memory store holds
    mem = MemoryStore(held)
    root = zarr.open_group(mem, mode="w", zarr_format=3)
    root.attrs[ATTRS_KEY] = prov.to_dict()
    create_arrays(root, store_layout(prov, sizes).values())
    tok = root["tokens"]
    assert isinstance(tok, zarr.Array)
    tok[:] = tokens.astype(np.int32)
    write_columns(root, columns, n)
    small = {k: v for k, v in weights.items() if v.dtype.kind in "UOT"}  # vocab: encoded for real
    write_weights(root, small, prov.layout)
    write_weights(root, {k: v for k, v in weights.items() if k not in small}, prov.layout, write=False)
    consolidate(mem)
    stored = dict(held)
    fields: list[FieldPlan] = []
    n_tok = n * prov.seq_len
    t_encode = 0.0
    for name in prov.fields:
        if name == "tokens":
            continue
        arr = root[name]
        assert isinstance(arr, zarr.Array)
        files = _grid(arr)
        if name == "pattern" and arr.shards is None:
            files = files * len(prov.stored_pattern_layers) // max(len(prov.layers), 1)
        if sample is not None and name in sample:
            t0 = time.perf_counter()
            per_batch = _encoded_bytes(root, held, name, sample[name], prov) * bs / sample[name].shape[0]
            t_encode += time.perf_counter() - t0
        elif _compressed(arr):
            per_batch = _raw_bytes_per_token(name, sizes, prov) * bs * prov.seq_len
        else:  # exact: values, a crc32c per inner chunk, the shard index
            per_batch = _uncompressed_batch_bytes(arr)
        # zarr writes edge chunks whole: a short last batch takes a full batch's bytes, padded with NaN,
        # which a compressor (pattern's LZ4) removes; + the array's zarr.json
        batches = n / bs if _compressed(arr) else n_batches
        total = int(per_batch * batches) + len(stored[f"{name}/zarr.json"])
        nbytes = math.prod(arr.shape) * arr.dtype.itemsize
        fields.append(FieldPlan(name, total / n_tok, total, files + 1, nbytes))
    w_bytes, w_files = _weights_size(root, stored, weights, small, shared)
    other_bytes, other_files = 0, 0
    counted = {*weights, *(n for w in small for n in stored_names(w)), *(f for f in prov.fields if f != "tokens")}
    for key, buf in stored.items():  # root metadata, tokens, columns, the manifest's metadata
        if key.split("/")[0] not in counted:
            other_bytes += len(buf)
            other_files += 1
    manifest = root[MANIFEST]
    assert isinstance(manifest, zarr.Array)
    other_files += _grid(manifest)
    other_bytes += _grid(manifest) * (bs + 13)  # uint8 per sequence, Zstd frame, checksum
    todo = n_batches if todo_batches is None else todo_batches
    return Plan(out, n_tok, n_batches, todo, tuple(fields), w_bytes, w_files, other_bytes, other_files,
                measured=sample is not None, creates=creates,
                seconds_per_batch={"encode": t_encode} if sample is not None else {})  # fmt: skip


def _weights_size(root: zarr.Group, stored: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                  small: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray] | None) -> tuple[int, int]:  # fmt: skip
    """Bytes and files of the store's weights (``small`` ones as encoded in ``stored``, the float ones exactly:
    values, a crc32c per chunk, the shard index) and of a new weights store's ``shared`` arrays."""
    w_bytes, w_files = 0, 0
    for wname, value in weights.items():
        if wname in small:  # vocab: its bytes and offsets arrays as encoded, metadata included
            keys = [k for k in stored if k.split("/")[0] in stored_names(wname)]
            w_bytes += sum(len(stored[k]) for k in keys)
            w_files += len(keys)
            continue
        arr = root[wname]
        assert isinstance(arr, zarr.Array)
        files = _grid(arr)
        w_files += files + 1
        n_inner = math.prod(-(-s // c) for s, c in zip(arr.shape, arr.chunks, strict=True))
        index = ENTRY_NBYTES * n_inner + CRC_NBYTES * files if arr.shards else 0
        w_bytes += value.nbytes + CRC_NBYTES * n_inner + index + len(stored[f"{wname}/zarr.json"])
    for value in (shared or {}).values():
        n_arrays = 2 if value.dtype.kind in "UOT" else 1  # vocab: bytes and offsets
        w_bytes += value.nbytes + n_arrays * (4 + 1500)  # one chunk, its checksum, its metadata (vocab: raw, a bound)
        w_files += 2 * n_arrays
    return w_bytes, w_files


def _encoded_bytes(root: zarr.Group, held: Mapping[str, Any], name: str, value: np.ndarray, prov: Provenance) -> int:
    """Bytes of one batch of ``name`` written with the store's layout and codecs (in memory)."""
    arr = root[name]
    assert isinstance(arr, zarr.Array)
    b = value.shape[0]
    if name == "pattern" and len(prov.stored_pattern_layers) < len(prov.layers):
        from headstore.store_schema.attention import pattern_layer_index

        full = np.full((b, arr.shape[1], *value.shape[2:]), np.nan, dtype=arr.dtype)
        full[:, pattern_layer_index(prov)] = value
        value = full
    before = {k for k in held if k.startswith(f"{name}/c")}
    arr.with_config({"write_empty_chunks": False})[0:b] = value.astype(arr.dtype, copy=False)
    return sum(len(v) for k, v in held.items() if k.startswith(f"{name}/c") and k not in before)


def _raw_bytes_per_token(name: str, sizes: Mapping[str, int], prov: Provenance) -> float:
    """Raw bytes per token of a field; ``pattern`` at its causal non-zero fraction ``(S + 1) / 2S`` and
    only its stored layers (LZ4 keeps about that: 0.52 of raw at S = 128, measured)."""
    f = FIELDS[name]
    item = np.dtype(field_dtype(name, prov.storage_dtype)).itemsize
    per_seq = float(math.prod(sizes[d] for d in f.dims if d != "batch") * item)
    if name == "pattern":
        s = prov.seq_len
        per_seq = per_seq * (s + 1) / (2 * s) * len(prov.stored_pattern_layers) / max(len(prov.layers), 1)
    return per_seq / prov.seq_len


def describe(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON values."""
    return {
        "out": plan.out,
        "n_tokens": plan.n_tokens,
        "n_batches": plan.n_batches,
        "fields": {
            f.name: {"bytes_per_token": f.bytes_per_token, "bytes": f.total_bytes, "files": f.files}
            for f in plan.fields
        },
        "weights_bytes": plan.weights_bytes,
        "total_bytes": plan.total_bytes,
        "n_files": plan.n_files,
        "estimated_seconds": plan.estimated_seconds if plan.seconds_per_batch else None,
    }


def plan_extract(
    out: Path,
    prov: Provenance,
    ds: Any,
    model: Any,
    weights: Mapping[str, np.ndarray],
    weights_dir: str | None,
    existing: bool,
    mine: list[int],
    hooks: Mapping[str, list[str]] | None = None,
    corrupt: np.ndarray | None = None,
) -> Plan:
    """The plan of one extract call: ``mine`` are this process's batch starts; with ``hooks`` (dry run)
    the first batch is run (warm-up, then timed) and encoded for the field bytes."""
    from headstore.extract.weights import vocab_strings
    from headstore.store_schema.arrays import store_sizes
    from headstore.store_schema.layout import SHARED
    from headstore.store_schema.read.reader import done_mask

    t_setup = time.perf_counter()
    store_w = dict(weights)
    d_vocab = prov.config["d_vocab"]
    if hooks is not None:  # dry run: the vocab strings as stored (decoding them takes ~1 s on 50k tokens)
        store_w["vocab"] = vocab_strings(model.tokenizer, d_vocab)
    else:  # the tokenizer's own token strings: about as long, and instant
        ids = sorted(model.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        store_w["vocab"] = np.asarray(([t for t, _ in ids] + [""] * d_vocab)[:d_vocab])
    w_e = store_w["W_E"]
    ee = np.broadcast_to(np.float32(0), w_e.shape)  # W_EE: as big as W_E, not computed for a plan
    shared: dict[str, np.ndarray] | None = None
    if weights_dir is not None:
        taken = {k: store_w.pop(k) for k in SHARED if k in store_w}
        if is_local(weights_dir) and not Path(weights_dir).exists():
            shared = {**taken, "W_EE": ee}
    elif 0 in prov.layers:
        store_w["W_EE"] = ee
    bs, n = prov.batch_size, ds.tokens.shape[0]
    todo = mine
    if existing:
        done = done_mask(out)
        todo = [s for s in mine if not done[s : s + bs].all()]
    sample, seconds = None, {}
    if hooks is not None:
        from headstore.extract.batch import run_batch
        from headstore.extract.grad import targets_for

        toks = ds.tokens[:bs]
        targets = targets_for(prov, ds, corrupt)  # --grad: its backward pass timed and its arrays measured too
        grad = None if targets is None else targets.rows(0, bs)
        run_batch(model, toks, prov, dict(hooks), grad=grad).arrays()  # warm-up
        t0 = time.perf_counter()
        sample = run_batch(model, toks, prov, dict(hooks), grad=grad).arrays()
        seconds["forward"] = time.perf_counter() - t0
    sizes = store_sizes(prov.config, prov, n)
    plan = make_plan(str(out), prov, sizes, ds.tokens, ds.columns, store_w, shared, len(todo), sample,
                     creates=not existing)  # fmt: skip
    setup = 0.0 if existing else time.perf_counter() - t_setup - seconds.get("forward", 0.0) * 2
    return replace(plan, seconds_per_batch={**seconds, **plan.seconds_per_batch}, setup_seconds=setup)
