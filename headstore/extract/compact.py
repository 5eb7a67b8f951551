"""Compact stores (``--fields compact`` = default - pattern + q, k): check at creation that this model's
attention really is what ``open_store`` will derive.

``headstore.store_schema.attention.derived_pattern`` computes ``softmax(mask(cap(q . k * scale)))`` with the
score scale, attention soft-cap and sliding windows the store's config records (``families.read_traits``:
Gemma-2's ``query_pre_attn_scalar`` and soft-cap, Mistral's and Gemma-2's windows). A model with anything
else in its attention (``scale_attn_by_inverse_layer_idx``, ALiBi, attention sinks) would get a silently
wrong derived pattern, so before creating a compact store one forward pass over a few of its sequences
compares the derivation with the live ``hook_pattern`` and refuses the store on a mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from headstore.extract import families
from headstore.store_schema import HeadstoreError
from headstore.store_schema.attention import pattern_block
from headstore.store_schema.provenance import ModelConfig

# float32 derivation vs the live pattern: measured 6e-8 on tiny-gpt2 / tiny-llama, 2.4e-6 on SmolLM2-135M at
# 512 tokens (other summation orders than torch's); a wrong scale or mask is off by orders of magnitude more.
ATOL = 1e-4


def derives_pattern(fields: Sequence[str]) -> bool:
    """True when ``pattern`` is not stored and ``open_store`` will derive it from ``q`` and ``k``."""
    return "pattern" not in fields and "q" in fields and "k" in fields


@torch.inference_mode()
def check_pattern_derivable(model: Any, tokens: np.ndarray, layers: Sequence[int], n_check: int = 2) -> float:
    """Max abs difference between the derived and the live pattern on ``tokens[:n_check]``; raises past ATOL."""
    bridge = model.bridge
    rot = "rot_" if model.rotary else ""
    names = [f"blocks.{L}.attn.hook_{x}" for L in layers for x in (f"{rot}q", f"{rot}k", "pattern")]
    x = torch.as_tensor(tokens[:n_check], dtype=torch.long, device=bridge.cfg.device)
    _, cache = families.run_with_cache(model, x, names)

    def stack(hook: str) -> np.ndarray:
        return np.stack([cache[f"blocks.{L}.attn.hook_{hook}"].float().cpu().numpy() for L in layers], axis=1)

    cfg = ModelConfig.from_dict(model.config_dict())
    windows = [cfg.window(L) for L in layers]
    derived = pattern_block(stack(f"{rot}q"), stack(f"{rot}k"), cfg.score_scale, cfg.attn_logit_softcap, windows)
    err = float(np.abs(derived - stack("pattern")).max())
    if not err <= ATOL:
        raise HeadstoreError(
            f"model {model.name!r}: softmax(q . k * {cfg.score_scale:.4g}) with a causal mask (and the recorded "
            f"soft-cap and sliding windows) differs from its attention pattern by {err:.2g} (ALiBi, attention sinks, "
            "a per-layer scale?): pattern cannot be derived, so keep it in --fields (e.g. default,q,k instead of compact)"
        )
    return err
