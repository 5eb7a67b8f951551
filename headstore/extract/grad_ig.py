"""EAP-IG gradients at extraction (``extract --grad METRIC --grad-ig STEPS --corrupt DATA``; Hanna, Pezzelle,
Belinkov 2024, "Have Faith in Faithfulness").

The input embeddings (block 0's input ``resid_pre[0]``: the token embeddings, plus the positional ones, which the
clean and corrupt prompts share) are moved along the straight path from the corrupt ``x'`` to the clean ``x``:

    x_k = x' + (k / m) (x - x'),   k = 0, 1, ..., m - 1

the points hannamw/EAP-IG's ``get_scores_eap_ig`` takes (``for step in range(0, steps)``, ``k / steps``): the
corrupt end is included and the clean end is not (the paper writes k = 1..m; the library's code, followed here,
k = 0..m-1). At each point one forward pass (clean tokens, clean metric targets) and one backward pass of M give the
gradients ``g_k``; the store holds what the analyzers need of their mean over k, exactly:

- receivers the gradient reaches linearly at their own input: ``grad_z`` (AtP), ``grad_mlp_in`` (``hook_mlp_in``,
  the MLP's copy of the residual before ln2) and ``grad_resid_final`` (the logits' input): the mean of ``g_k``.
- the q/k/v inputs of the heads, behind ln1, whose Jacobian ``J_k = (P - x_hat_k x_hat_k^T / d) / s_k`` (P the
  centring on LayerNorm models, the identity on RMSNorm ones; ``x_hat_k = P resid_pre_k / s_k``, ``s_k`` the ln1
  scale) moves along the path. The receiver's path-mean gradient is, for head h with weights W (d_model, d_head):

      mean_k J_k W g_k = P W gbar - mean_k x_hat_k c_k,   gbar = mean_k g_k / s_k,
                                                          c_k  = (x_hat_k W) . g_k / (d s_k)

  so ``grad_q`` / ``grad_k`` / ``grad_v`` hold ``gbar`` (head space, as in a plain store), ``ig_resid_hat`` the
  m normalised residuals ``x_hat_k`` (one d_model vector per step and position, shared by every head of the layer)
  and ``ig_coef_q`` / ``ig_coef_k`` / ``ig_coef_v`` the scalars ``c_k`` per step, position and head. Per-step
  head-space gradients with per-step residuals and scales would also be exact, at about four times the bytes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from headstore.extract.grad import GradTargets, by_field, grad_pass, hook_sources
from headstore.store_schema import HeadstoreError

_QKV = {"q": "W_Q", "k": "W_K", "v": "W_V"}


def check_corrupt(clean: Any, corrupt: Any, steps: int, model: Any) -> None:
    """Refuse a corrupt dataset (a TokenDataset) not of the clean one's shape (sequences, length, each sequence's
    real tokens), and a model without a pre-norm ln1 (its q/k/v inputs have no ln1 Jacobian to average)."""
    n, seq = clean.tokens.shape
    n2, seq2 = corrupt.tokens.shape
    if (n, seq) != (n2, seq2):
        raise HeadstoreError(
            f"--corrupt {corrupt.spec!r} gives {n2} sequences of {seq2} tokens, --data {clean.spec!r} {n} of {seq}: "
            "EAP-IG pairs them one to one; give a corrupt twin of the same shape (same --n-seq, --seq-len, --seed)"
        )
    a, b = (np.asarray(d.columns.get("length", np.full(n, seq))) for d in (clean, corrupt))
    bad = np.flatnonzero(a != b)
    if bad.size:
        i = int(bad[0])
        raise HeadstoreError(
            f"--corrupt {corrupt.spec!r}: sequence {i} has {int(b[i])} real tokens, {int(a[i])} in --data "
            f"{clean.spec!r} ({bad.size} sequence(s) differ): EAP-IG pairs sequences of the same lengths"
        )
    if not model.traits.get("pre_norm", True) or model.traits.get("post_norm", False):
        raise HeadstoreError(
            "--grad-ig: this model has no pre-norm ln1 before attention alone (post-norm or no pre-norm): extract "
            "with --grad without --grad-ig"
        )
    if steps <= 0:
        raise HeadstoreError(f"--grad-ig must be a positive number of steps, got {steps}")


class _Reached(Exception):
    """Raised by the hook that has what it needs: the rest of the forward pass is not run."""


def _block0_input(model: Any, toks: np.ndarray) -> torch.Tensor:
    """``blocks.0.hook_resid_pre`` of ``toks``: the input embeddings (with positions where the model adds them),
    the forward pass stopped there."""
    got: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any) -> torch.Tensor:
        got["x"] = t.detach().clone()
        raise _Reached

    x = torch.as_tensor(toks, dtype=torch.long, device=model.bridge.cfg.device)
    with torch.inference_mode(), contextlib.suppress(_Reached):
        model.bridge.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", keep)], return_type=None)
    if "x" not in got:
        raise HeadstoreError(f"--grad-ig: blocks.0.hook_resid_pre did not fire in {model.name}'s forward pass")
    return got["x"].float()


def grad_batch_ig(
    model: Any, toks: np.ndarray, layers: tuple[int, ...], targets: GradTargets
) -> dict[str, torch.Tensor]:
    """Every grad and IG field of one batch (module docstring), (batch, layer, ...) in float32; ``targets`` holds
    the batch's corrupt tokens and the number of steps."""
    assert targets.corrupt is not None and targets.steps > 0
    bridge, m = model.bridge, targets.steps
    sources = hook_sources(layers, int(bridge.cfg.n_layers))
    wanted = [h for hs in sources.values() for h in hs]
    extra = tuple(f"blocks.{L}.{h}" for L in layers for h in ("hook_resid_pre", "ln1.hook_scale"))
    clean, bad = _block0_input(model, toks), _block0_input(model, targets.corrupt)
    weights = {w: getattr(bridge, name)[list(layers)].detach().float() for w, name in _QKV.items()}
    layer_norm = str(bridge.cfg.normalization_type).startswith("LN")
    total: dict[str, torch.Tensor] = {}
    steps: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(False):
        for k in range(m):  # hannamw/EAP-IG: k = 0..m-1 (module docstring)
            acts, got = grad_pass(model, toks, targets, wanted, extra, start=bad + (k / m) * (clean - bad))
            fields = by_field(got, sources)
            x_hat, scale = _normalised(acts, layers, layer_norm)  # (batch, layer, pos, d_model), (batch, layer, pos)
            for w in "qkv":
                g = fields[f"grad_{w}"]  # (batch, layer, pos, head, d_head)
                fields[f"grad_{w}"] = g / scale[..., None, None]
                proj = torch.einsum("blpm,lhme->blphe", x_hat, weights[w])
                steps.setdefault(f"ig_coef_{w}", []).append((proj * g).sum(-1) / (x_hat.shape[-1] * scale[..., None]))
            steps.setdefault("ig_resid_hat", []).append(x_hat)
            for name, t in fields.items():
                total[name] = t if name not in total else total[name] + t
    out = {name: t / m for name, t in total.items()}
    out.update({name: torch.stack(ts, dim=2) for name, ts in steps.items()})  # (batch, layer, ig_step, ...)
    return out


def _normalised(
    acts: dict[str, torch.Tensor], layers: tuple[int, ...], layer_norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """ln1's normalised input ``P resid_pre / s`` (batch, layer, pos, d_model) and its scale ``s`` (batch, layer,
    pos), from the step's own hooks."""
    resid = torch.stack([acts[f"blocks.{L}.hook_resid_pre"].float() for L in layers], dim=1)
    scale = torch.stack([acts[f"blocks.{L}.ln1.hook_scale"].float()[..., 0] for L in layers], dim=1)
    if layer_norm:
        resid = resid - resid.mean(-1, keepdim=True)
    return resid / scale[..., None], scale
