"""One batch through the model: the hooked forward pass, each hooked activation copied as it fires, in its
storage dtype, into its layer of a reused host buffer (on a GPU, then to reused pinned host memory on a side
stream)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from headstore.extract.families import run_hooked
from headstore.extract.grad import GradTargets, grad_batch
from headstore.extract.grad_ig import grad_batch_ig
from headstore.extract.models import LoadedModel
from headstore.extract.pinned import PinnedPool
from headstore.store_schema import FIELDS, HeadstoreError, Provenance


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


class HostBatch:
    """One batch's fields on their way to host memory; ``arrays()`` waits for the copies to land.

    On CUDA the device-to-host copies are issued on a side stream into pinned memory, so the next
    batch's forward pass runs while they complete; the writer thread waits on ``done``. On CPU the
    tensors are host tensors already and ``done`` is None.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], dev: torch.device, pool: PinnedPool | None = None) -> None:
        self.done: torch.cuda.Event | None = None
        self.pool: PinnedPool | None = None  # where ``release`` gives the pinned buffers back (CUDA only)
        if dev.type != "cuda":
            self.tensors = tensors
            return
        self.pool = pool if pool is not None else PinnedPool()
        side = _copy_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))  # the copies start after the forward that made them
        self.tensors = {}
        with torch.cuda.stream(side):
            for name, t in tensors.items():
                host = self.pool.take(tuple(t.shape), t.dtype)  # given back by release, after the batch's write
                host.copy_(t, non_blocking=True)
                t.record_stream(side)  # the caching allocator must not reuse t's memory before the copy ran
                self.tensors[name] = host
            self.done = torch.cuda.Event()
            self.done.record(side)

    def arrays(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return {name: t.numpy() for name, t in self.tensors.items()}

    def release(self) -> None:
        """The batch is written: its pinned buffers go back to the pool (no-op on CPU). Nothing may read
        ``arrays()`` afterwards; the copies into them completed (``arrays`` waited on ``done``)."""
        if self.pool is not None:
            if self.done is not None:
                self.done.synchronize()  # released unread (a failed run): the copies must land first
            self.pool.give_back(self.tensors.values())
            self.pool, self.tensors = None, {}


@functools.cache
def _copy_stream(dev: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(dev)


class HostBuffers:
    """The per-layer fields' output tensors on the CPU, reused every other batch.

    Stacking a batch's layers into a fresh tensor faults in new pages each batch, several times slower than
    writing into a reused tensor (docs/benchmarks.md, "Figures behind extract's code"). Two sets suffice: the writer holds batch k's
    arrays while batch k+1 fills the other set, and ``_fill`` waits for batch k's write before batch k+2
    starts. On a GPU every batch takes fresh device memory from torch's caching allocator (cheap) and
    ``HostBatch`` copies it out into pinned buffers from ``pinned``, reused once the batch is written.
    """

    def __init__(self, pinned: PinnedPool | None = None) -> None:
        self.sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        self.turn = 0
        self.pinned = pinned if pinned is not None else PinnedPool()  # GPU: pinned buffers HostBatch copies into

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
    sequence at a time: one log-softmax over a whole batch's logits maps and faults in ~200 MB each batch, and
    is slower for the same values (docs/benchmarks.md, "Figures behind extract's code")."""
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
    grad: GradTargets | None = None,
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
    if grad is not None:  # extract --grad: one more forward pass with autograd, and its backward pass
        run_grad = grad_batch_ig if grad.steps else grad_batch  # --grad-ig: one pass per point of the path
        tensors.update({n: _stored(n, t, prov) for n, t in run_grad(model, toks, prov.layers, grad).items()})
    return HostBatch(tensors, x.device, buffers.pinned)


def _stored(name: str, t: torch.Tensor, prov: Provenance) -> torch.Tensor:
    """A float32 tensor of a storage-dtype field, in the store's dtype (float16: its range checked first)."""
    if prov.storage_dtype != "float16":
        return t.contiguous()
    check_float16(name, None, t)
    return t.to(torch.float16).contiguous()


def _stored_layer(name: str, i: int, prov: Provenance) -> int:
    """The model layer of the i-th stored layer of a per-layer field."""
    return (prov.stored_pattern_layers if name == "pattern" else prov.layers)[i]
