"""Attribution patching (AtP; Nanda 2023, Kramar et al. 2024 "AtP*") for every head, from a clean store with
gradients (``extract --grad METRIC``, or EAP-IG's path-averaged ones with ``--grad-ig STEPS --corrupt DATA``) and
its corrupt twin::

    per_position[L, h, pos] = mean_b  sum_d_head (z_corrupt[b, L, pos, h] - z_clean[b, L, pos, h]) . grad_z[b, L, pos, h]
    per_sequence[L, h, b]   = sum_pos sum_d_head (z_corrupt - z_clean)[b, L, pos, h] . grad_z[b, L, pos, h]
    score[L, h]             = mean_b per_sequence[L, h, b]

``grad_z`` = dM/dz at the clean input, M the clean store's metric (``attrs["metric"]``); in an EAP-IG store its mean
over the m points of the path from the corrupt to the clean input embeddings (``attrs["grad_ig"]`` = m, 0 for plain
gradients; ``headstore.extract.grad_ig``). On the head's result
instead of z the score is the same (``dM/dz = dM/dresult @ W_O[h]^T``). It is the first-order estimate of the
change of M when the head's z is patched from the corrupt run: differentiating through every norm (nothing
frozen), as online AtP does.

This module also holds what edge attribution shares with it: the checks on a clean/corrupt pair of stores, and
the gradient at a receiver's input through its pre-norm, from the stored head-space gradients. A norm with
folded gain normalises ``x`` (``d_model``) to ``x_hat = c(x) / s`` with ``c`` the centring (LN) or the identity
(RMS) and ``s`` the stored scale. Its Jacobian is symmetric, ``J = (I - 1 1^T / d [LN only] - x_hat x_hat^T / d)
/ s``, so a gradient ``g`` at the norm's output is ``J g = (g - mean(g) [LN only] - x_hat (x_hat . g) / d) / s`` at
its input; at head h's q input it is ``J (W_Q[L, h] @ dM/dq[h])`` (pre-rotary q), likewise for k and v per kv
head: what TransformerLens gives at ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (split q/k/v input).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from headstore.analyze._args import check_aligned
from headstore.analyze._maths import f32, require
from headstore.analyze.registry import AnalyzerSpec, register_analyzer
from headstore.store_schema import HeadstoreError
from headstore.store_schema.layout import GRAD_FIELDS

NAME = "attribution-patching"
REQUIRES = ("z", "grad_z")


def attribution_patching(clean: xr.Dataset, corrupt: xr.Dataset, *, per_position: bool = False) -> xr.Dataset:
    """AtP score of every head (module docstring); ``per_position=True`` adds ``per_position`` (layer, head, pos).

    ``clean`` holds the gradients; ``corrupt`` the same prompts' corrupted twins (e.g. ``--data ioi`` and
    ``ioi-abc`` with the same ``--seed`` and ``--n-seq``). Lazy: sums stream over the stores' batch chunks."""
    metric = check_pair(clean, corrupt, NAME, REQUIRES)
    dz = f32(corrupt["z"]) - f32(clean["z"])
    per = xr.dot(dz, f32(clean["grad_z"]), dim="d_head", optimize=True)  # (batch, layer, pos, head)
    per_sequence = per.sum("pos").transpose("layer", "head", "batch")
    out = xr.Dataset({"score": per_sequence.mean("batch"), "per_sequence": per_sequence})
    if per_position:
        out["per_position"] = per.mean("batch").transpose("layer", "head", "pos")
    out.attrs = {"analyzer": NAME, "metric": metric, "per_position": int(per_position), "grad_ig": ig_steps(clean)}
    return out


def ig_steps(clean: xr.Dataset) -> int:
    """The number of EAP-IG steps the clean store's gradients are averaged over (``extract --grad-ig``); 0: plain
    gradients at the clean input (AtP, EAP)."""
    return int(clean.hs.provenance.grad_ig or 0)


def check_pair(clean: xr.Dataset, corrupt: xr.Dataset, analyzer: str, needs: tuple[str, ...]) -> str:
    """Refuse a clean store without gradients, a pair of different models, sequences or shapes, or two stores
    whose gradients are of different metrics; returns the clean store's metric."""
    metric, other = clean.hs.provenance.grad, corrupt.hs.provenance.grad
    if metric is None or any(n not in clean for n in GRAD_FIELDS):
        swap = " (the corrupt store has them: pass the clean store first)" if other is not None else ""
        raise HeadstoreError(
            f"{analyzer}: the clean store holds no gradients{swap}: extract it with --grad METRIC "
            "(e.g. --grad logit-diff:io_token,s_token@end_pos)"
        )
    if other is not None and other != metric:
        raise HeadstoreError(
            f"{analyzer}: the two stores hold gradients of different metrics ({metric!r} vs {other!r}): "
            "extract them with the same --grad"
        )
    check_aligned(clean, corrupt, analyzer)
    path = clean.hs.provenance.corrupt  # EAP-IG: the path starts at these corrupt prompts
    if path is not None and path.sha256 != corrupt.hs.provenance.dataset.sha256:
        raise HeadstoreError(
            f"{analyzer}: the clean store's EAP-IG gradients run from --corrupt {path.spec!r}, but the corrupt "
            f"store holds other prompts ({corrupt.hs.provenance.dataset.spec!r}): pair it with the store of "
            f"{path.spec!r} (same --seed and --n-seq)"
        )
    require(clean, needs, analyzer)
    require(corrupt, tuple(n for n in needs if not n.startswith(("grad_", "ig_"))), analyzer)
    return metric


def norm_input_grad(g: np.ndarray, resid: np.ndarray, scale: np.ndarray, layer_norm: bool) -> np.ndarray:
    """``J g``: ``g`` (pos, ..., d_model) at a pre-norm's output -> at its input ``resid`` (pos, d_model) with
    stored scale ``scale`` (pos,; eps is in it); LN when ``layer_norm``, else RMSNorm."""
    x = resid - resid.mean(-1, keepdims=True) if layer_norm else resid
    x_hat = (x / scale[:, None]).reshape(x.shape[0], *(1,) * (g.ndim - 2), x.shape[-1])
    d = g.shape[-1]
    out = g - x_hat * (x_hat * g).sum(-1, keepdims=True) / d
    if layer_norm:
        out = out - g.mean(-1, keepdims=True)
    return out / scale.reshape(scale.shape[0], *(1,) * (g.ndim - 1))


def head_input_grads(
    grad: np.ndarray, w: np.ndarray, resid: np.ndarray, scale: np.ndarray, layer_norm: bool
) -> np.ndarray:
    """(pos, head, d_model) the gradient at each head's (or kv head's) own input: ``grad`` (pos, head, d_head)
    at hook_q/k/v, ``w`` (head, d_model, d_head) its layer's W_Q/W_K/W_V, ``resid`` (pos, d_model) the block's
    ``resid_pre``, ``scale`` (pos,) its ``ln1_scale``."""
    # per head a (pos, d_head) @ (d_head, d_model) GEMM: numpy's einsum of this form runs ~5x slower
    g_ln = (np.ascontiguousarray(grad.transpose(1, 0, 2)) @ w.transpose(0, 2, 1)).transpose(1, 0, 2)
    return norm_input_grad(g_ln, resid, scale, layer_norm)


def ig_head_input_grads(
    grad: np.ndarray, w: np.ndarray, x_hat: np.ndarray, coef: np.ndarray, layer_norm: bool
) -> np.ndarray:
    """(pos, head, d_model) the EAP-IG path-mean gradient at each head's (or kv head's) own input, ``mean_k J_k W
    g_k = P W gbar - mean_k x_hat_k c_k`` (``headstore.extract.grad_ig``): ``grad`` (pos, head, d_head) the stored
    ``gbar``, ``w`` (head, d_model, d_head), ``x_hat`` (ig_step, pos, d_model) the stored ``ig_resid_hat``,
    ``coef`` (ig_step, pos, head) the stored ``ig_coef_q/k/v``; P centres on LN models."""
    g_ln = np.einsum("phe,hme->phm", grad, w)
    if layer_norm:
        g_ln = g_ln - g_ln.mean(-1, keepdims=True)
    return g_ln - np.einsum("kph,kpm->phm", coef, x_hat) / x_hat.shape[0]


SPEC = AnalyzerSpec(
    NAME,
    attribution_patching,
    REQUIRES,
    n_stores=2,
    doc="AtP per head: mean over prompts of sum over positions of (z_corrupt - z_clean) . dM/dz (clean store: --grad)",
    params={"per_position": bool},
)
register_analyzer(SPEC)
