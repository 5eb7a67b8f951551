"""Gradients at extraction (``extract --grad METRIC``): the metric grammar, and one backward pass per batch.

A metric M is a scalar per sequence, written the same way on the command line and in Python
(``ExtractRequest(..., grad="logit-diff:io_token,s_token@end_pos")``):

- ``loss``: the sum of the sequence's next-token losses over its real positions (``p + 1 < length``);
- ``logit:TOK@POS``: the logit of token TOK at position POS;
- ``logit-diff:TOK_A,TOK_B@POS``: ``logit[TOK_A] - logit[TOK_B]`` at POS.

TOK is a token id or a per-sequence column (``io_token``); POS an int (negative counts back from the
sequence's last real token, as everywhere in headstore) or a column (``end_pos``). The logits are the
model's own (after a final soft-cap where the family has one).

Each batch runs one more forward pass with autograd on, and one backward pass of the sum over its
sequences of M (sequences do not interact, so each sequence's slice is its own gradient). Stored, per
extracted layer L (``headstore.store_schema.layout.GRAD_FIELDS``): ``grad_z`` = dM/d ``attn.hook_z``,
``grad_q`` / ``grad_k`` / ``grad_v`` at ``attn.hook_q`` / ``hook_k`` / ``hook_v`` (pre-rotary, and before the
q/k norm of Qwen3, OLMo-2; k and v per kv head), ``grad_mlp_in`` at ``hook_mlp_in`` (the MLP's own copy of the residual, before its norm) and
``grad_resid_final`` at the last block's ``hook_resid_post`` (the logits' input). With ``resid_pre``, the
ln1 scales and the weights they give every receiver's input gradient (``headstore.analyze._attribution``).
EAP-IG's path-averaged form (``--grad-ig STEPS --corrupt DATA``) is ``headstore.extract.grad_ig``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from headstore.extract.families import _unflatten, attn_result
from headstore.store_schema import HeadstoreError
from headstore.store_schema.layout import GRAD_FIELDS

SYNTAX = "loss, logit:TOK@POS or logit-diff:TOK_A,TOK_B@POS (TOK an id or a column, POS an int or a column)"
_SOURCES = {
    "grad_z": "blocks.{L}.attn.hook_z",
    "grad_q": "blocks.{L}.attn.hook_q",
    "grad_k": "blocks.{L}.attn.hook_k",
    "grad_v": "blocks.{L}.attn.hook_v",
    "grad_mlp_in": "blocks.{L}.hook_mlp_in",
    "grad_resid_final": "blocks.{last}.hook_resid_post",
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class GradMetric:
    """A parsed ``--grad`` metric: ``kind`` (``loss``, ``logit``, ``logit-diff``), its tokens (ids or column
    names) and position (an int, a column name, or None for ``loss``). ``str()`` gives the canonical spec."""

    kind: str
    tokens: tuple[int | str, ...] = ()
    pos: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "loss":
            return "loss"
        return f"{self.kind}:{','.join(str(t) for t in self.tokens)}@{self.pos}"


def parse_metric(spec: str) -> GradMetric:
    """``"logit-diff:io_token,s_token@end_pos"`` -> GradMetric; bad syntax is one line naming the grammar."""
    text = spec.strip()
    if text == "loss":
        return GradMetric("loss")
    kind, _, rest = text.partition(":")
    toks, at, pos = rest.partition("@")
    want = {"logit": 1, "logit-diff": 2}.get(kind)
    items = [t.strip() for t in toks.split(",")]
    if want is None or not at or len(items) != want or not all(_item(t, False) for t in items) or not _item(pos, True):
        raise HeadstoreError(f"--grad {spec!r}: expected {SYNTAX}")
    return GradMetric(kind, tuple(_value(t) for t in items), _value(pos.strip()))


def _item(text: str, signed: bool) -> bool:
    text = text.strip()
    return bool(_NAME.fullmatch(text) or (_INT.fullmatch(text) and (signed or not text.startswith("-"))))


def _value(text: str) -> int | str:
    return int(text) if _INT.fullmatch(text) else text


@dataclass(frozen=True)
class GradTargets:
    """A metric resolved for every sequence: ``tok`` (n, k) token ids, ``pos`` (n,) absolute positions (``loss``:
    zeros), ``length`` (n,) real tokens per sequence; with EAP-IG (``--grad-ig``) ``corrupt`` (n, seq_len) the
    paired corrupt tokens and ``steps`` the points on the path (``headstore.extract.grad_ig``)."""

    metric: GradMetric
    tok: np.ndarray
    pos: np.ndarray
    length: np.ndarray
    corrupt: np.ndarray | None = None
    steps: int = 0

    def rows(self, start: int, stop: int) -> GradTargets:
        sl = slice(start, stop)
        bad = None if self.corrupt is None else self.corrupt[sl]
        return replace(self, tok=self.tok[sl], pos=self.pos[sl], length=self.length[sl], corrupt=bad)


def resolve_metric(
    metric: GradMetric, tokens: np.ndarray, columns: Mapping[str, np.ndarray], d_vocab: int
) -> GradTargets:
    """Per-sequence ids and positions; a missing column, an id outside the vocabulary or a position outside a
    sequence's real tokens is refused in one line."""
    n, seq_len = tokens.shape
    length = np.asarray(columns["length"], np.int64) if "length" in columns else np.full(n, seq_len, np.int64)

    def column(value: int | str, what: str) -> np.ndarray:
        if isinstance(value, int):
            return np.full(n, value, np.int64)
        if value not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise HeadstoreError(
                f"--grad {metric}: {what} names column {value!r}, which this data lacks (it has {have})"
            )
        return np.asarray(columns[value]).astype(np.int64)

    tok = np.stack([column(t, "a token") for t in metric.tokens], axis=1) if metric.tokens else np.zeros((n, 0), int)
    bad_tok = (tok < 0) | (tok >= d_vocab)
    if bad_tok.any():
        i = int(np.argwhere(bad_tok)[0, 0])
        raise HeadstoreError(
            f"--grad {metric}: token id {int(tok[bad_tok][0])} of sequence {i} is outside the vocabulary [0, {d_vocab})"
        )
    if metric.pos is None:
        return GradTargets(metric, tok, np.zeros(n, np.int64), length)
    raw = column(metric.pos, "the position")
    pos = np.where(raw < 0, length + raw, raw)
    bad = np.flatnonzero((pos < 0) | (pos >= length))
    if bad.size:
        i = int(bad[0])
        raise HeadstoreError(
            f"--grad {metric}: position {int(raw[i])} is outside sequence {i} ({int(length[i])} real tokens; "
            f"{bad.size} sequence(s) out of range)"
        )
    return GradTargets(metric, tok, pos, length)


def metric_values(logits: torch.Tensor, x: torch.Tensor, t: GradTargets) -> torch.Tensor:
    """(batch,) M of each sequence from the model's logits (batch, pos, d_vocab), in float32."""
    b = torch.arange(x.shape[0], device=x.device)
    if t.metric.kind == "loss":
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
        real = (
            torch.arange(x.shape[1] - 1, device=x.device)[None] + 1
            < torch.as_tensor(t.length, device=x.device)[:, None]
        )
        return -(logp * real).sum(-1)
    at = logits[b, torch.as_tensor(t.pos, device=x.device)].float()  # (batch, d_vocab)
    tok = torch.as_tensor(t.tok, device=x.device)
    out = at[b, tok[:, 0]]
    return out - at[b, tok[:, 1]] if t.metric.kind == "logit-diff" else out


def check_grad_model(model: Any) -> None:
    """Refuse the families whose gradients headstore cannot take at every receiver: GPT-J (its MLP reads ln1's
    output: no ``hook_mlp_in``) and OPT (TransformerBridge gives it no split q/k/v inputs, nor a per-position
    MLP input)."""
    from headstore.extract.families import family_label

    missing = model.unrepresentable
    why = (
        "feeds its MLP from ln1's output (no hook_mlp_in)" if "ln2_scale" in missing and "ln1_scale" not in missing
        else "has no split q/k/v inputs nor a per-position MLP input in TransformerBridge"
        if model.architecture == "OPTForCausalLM" else ""
    )  # fmt: skip
    if why:
        label = family_label(model.architecture)
        raise HeadstoreError(
            f"--grad: {label} {why}, which headstore's gradients do not cover yet: extract without --grad"
        )


def check_grad(model: Any, metric: GradMetric, ds: Any) -> None:
    """Refuse, before anything runs, a family ``--grad`` does not cover and a metric the dataset ``ds`` (a
    TokenDataset) cannot resolve."""
    check_grad_model(model)
    resolve_metric(metric, ds.tokens, ds.columns, int(model.config_dict()["d_vocab"]))


def hook_sources(layers: tuple[int, ...], n_layers: int) -> dict[str, list[str]]:
    """Grad field -> the hook names whose gradient it holds (one per extracted layer where per-layer)."""
    out = {}
    for name in GRAD_FIELDS:
        src = _SOURCES[name].replace("{last}", str(n_layers - 1))
        out[name] = [src.replace("{L}", str(L)) for L in layers] if "{L}" in src else [src]
    return out


@contextlib.contextmanager
def _grad_mode(bridge: Any) -> Iterator[None]:
    """``hook_mlp_in`` on (the MLP's own copy of the residual) and the weights frozen (no weight gradients are
    kept: autograd then saves only what the activations' gradients need), as they were afterwards."""
    was_mlp_in = bool(getattr(bridge.cfg, "use_hook_mlp_in", False))
    params = [p for p in bridge.parameters() if p.requires_grad]
    bridge.set_use_hook_mlp_in(True)
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
        bridge.set_use_hook_mlp_in(was_mlp_in)


def grad_pass(
    model: Any,
    toks: np.ndarray,
    targets: GradTargets,
    wanted: list[str],
    extra: tuple[str, ...] = (),
    start: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass of ``toks`` with autograd and one backward pass of the sum over sequences of M: (the
    activations at the hooks ``wanted`` and ``extra``, the gradients at ``wanted``). ``start`` (batch, pos,
    d_model), when given, replaces block 0's input (``blocks.0.hook_resid_pre``): EAP-IG's interpolated embeddings."""
    bridge = model.bridge
    acts: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        if name == "blocks.0.hook_resid_pre":  # the leaf every gradient flows back to (weights are frozen)
            t = (t if start is None else start.to(t.dtype)).detach().requires_grad_(True)
        acts[name] = t
        return t  # returned, so the bridge computes on with this very tensor and its gradient is defined

    names = sorted({"blocks.0.hook_resid_pre", *wanted, *extra})
    with _grad_mode(bridge), attn_result(bridge, False):  # the model's own o_proj, as a store without result
        x = torch.as_tensor(toks, dtype=torch.long, device=bridge.cfg.device)
        fwd = [(n, lambda t, hook, n=n: keep(t, hook, n)) for n in names]
        logits = bridge.run_with_hooks(x, fwd_hooks=fwd, return_type="logits")
        missing = sorted(set(names) - set(acts))
        if missing:
            raise HeadstoreError(f"--grad: hooks {missing[:3]} did not fire in {model.name}'s forward pass")
        total = metric_values(logits, x, targets).sum()
        grads = torch.autograd.grad(total, [acts[h] for h in wanted], allow_unused=True)
    got = {h: torch.zeros_like(acts[h]) if g is None else g.detach() for h, g in zip(wanted, grads, strict=True)}
    return {h: _unflatten(t.detach(), x.shape) for h, t in acts.items()}, {
        h: _unflatten(g, x.shape).float() for h, g in got.items()
    }


def by_field(got: Mapping[str, torch.Tensor], sources: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
    """Hook name -> tensor, gathered per field: (batch, layer, ...) for the per-layer fields."""
    out: dict[str, torch.Tensor] = {}
    for name, hs in sources.items():
        parts = [got[h] for h in hs]
        out[name] = torch.stack(parts, dim=1) if len(hs) > 1 or "{L}" in _SOURCES[name] else parts[0]
    return out


def grad_batch(model: Any, toks: np.ndarray, layers: tuple[int, ...], targets: GradTargets) -> dict[str, torch.Tensor]:
    """One forward and one backward pass of ``toks``: every grad field of the batch, (batch, layer, ...) in
    float32 (``headstore.extract.batch`` casts them to the storage dtype)."""
    sources = hook_sources(layers, int(model.bridge.cfg.n_layers))
    _, got = grad_pass(model, toks, targets, [h for hs in sources.values() for h in hs])
    return by_field(got, sources)


def with_grad_fields(fields: tuple[str, ...], metric: GradMetric | None, ig: bool = False) -> tuple[str, ...]:
    """``--fields`` plus, with a metric, every grad field and ``resid_pre`` (the receivers' norms and the MLP
    senders need it), and with ``ig`` (``--grad-ig``) every IG field, in schema order; grad fields named without
    ``--grad``, IG fields without ``--grad-ig``, are refused."""
    from headstore.store_schema.layout import FIELDS, IG_FIELDS

    named = [n for n in fields if n in GRAD_FIELDS and metric is None]
    if named:
        raise HeadstoreError(f"--fields {named[0]}: gradients need a metric: extract with --grad METRIC ({SYNTAX})")
    named = [n for n in fields if n in IG_FIELDS and not ig]
    if named:
        raise HeadstoreError(f"--fields {named[0]}: an EAP-IG field: extract with --grad-ig STEPS --corrupt DATA")
    if metric is None:
        return fields
    wanted = {*fields, *GRAD_FIELDS, "resid_pre", *(IG_FIELDS if ig else ())}
    return tuple(n for n in FIELDS if n in wanted)


def targets_for(prov: Any, ds: Any, corrupt: np.ndarray | None = None) -> GradTargets | None:
    """The store's metric (``prov.grad``) resolved on the dataset ``ds`` (a TokenDataset); None without one.
    EAP-IG stores (``prov.grad_ig``) take the paired ``corrupt`` tokens."""
    if prov.grad is None:
        return None
    t = resolve_metric(parse_metric(prov.grad), ds.tokens, ds.columns, int(prov.config["d_vocab"]))
    if prov.grad_ig is None:
        return t
    if corrupt is None:
        raise HeadstoreError("an EAP-IG store (--grad-ig) is filled with its --corrupt data's tokens: give --corrupt")
    return replace(t, corrupt=np.asarray(corrupt), steps=int(prov.grad_ig))
