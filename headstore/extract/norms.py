"""The weights of a model's norms, read from its modules: the affine part of a norm (its gain and bias, or
``1 + weight`` as Gemma's norms apply it), the per-head q/k norm gains, and the post-attention norm's gain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from headstore.extract.families import family_label, hf_attention
from headstore.store_schema import HeadstoreError


@torch.inference_mode()
def norm_affine(norm: Any, d_model: int, normalization_type: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(gain, bias) of a norm module's affine part (``out = normalized * gain + bias``); None when it is the
    identity (folded). The module's own ``weight`` (or ``1 + weight``: Gemma's norms, told apart by the output
    on random inputs) and ``bias``; measured where the module has no weight."""
    mod = getattr(norm, "original_component", None) or norm
    param = next(iter(mod.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, d_model), generator=g, dtype=torch.float32)
    xc = x - x.mean(-1, keepdim=True) if normalization_type == "LN" else x
    eps = float(getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-5)) or 1e-5)
    normalized = xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
    device = param.device if param is not None else torch.device("cpu")
    out = norm(x.to(device, dtype).unsqueeze(0))[0].float().cpu()
    a = torch.stack([normalized, torch.ones_like(normalized)], dim=-1)  # per dim: out = a @ (gain, bias)
    sol = torch.linalg.lstsq(a.permute(1, 0, 2), out.T.unsqueeze(-1)).solution[..., 0]  # (d_model, 2)
    gain, bias = sol[:, 0], sol[:, 1]
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if isinstance(w, torch.Tensor) and w.shape == gain.shape:
        w = w.detach().float().cpu()
        gain = min((w, 1.0 + w), key=lambda c: float((gain - c).abs().max()))  # the closer (bf16: 1e-2 apart at most)
        bias = (
            b.detach().float().cpu()
            if isinstance(b, torch.Tensor) and b.shape == bias.shape
            else torch.zeros_like(bias)
        )
        if bool((gain == 1).all()) and bool((bias == 0).all()):
            return None
    elif torch.allclose(gain, torch.ones_like(gain), atol=1e-5) and torch.allclose(
        bias, torch.zeros_like(bias), atol=1e-5
    ):
        return None
    return gain.numpy().astype(np.float32), bias.numpy().astype(np.float32)


@torch.inference_mode()
def qk_norm_gain(model: Any, layers: Sequence[int], which: str) -> np.ndarray:
    """(layer, head or kv_head, d_head) the gain of each layer's q (``which="q"``) or k norm: ``per_head`` one
    d_head vector for every head, ``full`` one over all heads' queries (keys), reshaped per head. Read as the
    weight (Qwen3, OLMo-2) or ``1 + weight`` (Gemma-3), whichever the norm applies to a vector of ones."""
    cfg = model.config_dict()
    n_h = cfg["n_heads"] if which == "q" else cfg["n_key_value_heads"]
    d_h = cfg["d_head"]
    out = []
    for L in layers:
        norm = getattr(hf_attention(model.bridge, L), f"{which}_norm")
        size = d_h if model.traits["qk_norm"] == "per_head" else n_h * d_h
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        w = norm.weight.detach()
        got = norm(torch.ones((1, size), dtype=w.dtype, device=w.device))[0].float() * np.sqrt(1.0 + eps)
        # the weight itself or 1 + weight (Gemma-3), whichever the norm applies
        gain = min((w.float(), 1.0 + w.float()), key=lambda c: float((got - c).abs().max())).cpu().numpy()
        out.append(np.broadcast_to(gain, (n_h, d_h)) if size == d_h else gain.reshape(n_h, d_h))
    return np.stack(out).astype(np.float32)


@torch.inference_mode()
def post_norm_gain(model: Any, layers: Sequence[int]) -> np.ndarray:
    """(layer, d_model) the gain of each layer's norm on the attention output (``ln1_post``), measured; a norm
    with a bias (an additive term no head owns) is refused."""
    cfg = model.config_dict()
    out = []
    for L in layers:
        affine = norm_affine(model.bridge.blocks[L].ln1_post, cfg["d_model"], cfg["normalization_type"])
        if affine is None:
            out.append(np.ones(cfg["d_model"], np.float32))
            continue
        gain, bias = affine
        if not np.allclose(bias, 0.0, atol=1e-6):
            raise HeadstoreError(
                f"{family_label(model.architecture)}: its post-attention norm has a bias: not supported"
            )
        out.append(gain)
    return np.stack(out).astype(np.float32)
