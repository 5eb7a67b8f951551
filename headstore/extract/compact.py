"""Stores that derive fields on open (``--fields compact`` = default - pattern + q, k; ``--fields auto``, the
default = default - z, with q, k for pattern where smaller): resolve ``auto`` at the run's seq_len, and check at
creation that this model's attention really is what ``open_store`` will derive.

``headstore.store_schema.attention.derived_pattern`` computes ``softmax(mask(cap(q . k * scale)))`` with the
score scale, attention soft-cap and sliding windows the store's config records (``families.read_traits``:
Gemma-2's ``query_pre_attn_scalar`` and soft-cap, Mistral's and Gemma-2's windows). A model with anything
else in its attention (``scale_attn_by_inverse_layer_idx``, ALiBi, attention sinks) would get a silently
wrong derived pattern, so before creating a compact store one forward pass over a few of its sequences
compares the derivation with the live ``hook_pattern`` and refuses the store on a mismatch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from headstore.extract import families
from headstore.store_schema import HeadstoreError
from headstore.store_schema.attention import pattern_block, z_block
from headstore.store_schema.layout import FIELDS, derived_fields
from headstore.store_schema.provenance import ModelConfig

# float32 derivation vs the live pattern: measured 6e-8 on tiny-gpt2 / tiny-llama, 2.4e-6 on SmolLM2-135M at
# 512 tokens (other summation orders than torch's); a wrong scale or mask is off by orders of magnitude more.
ATOL = 1e-4
# z = pattern @ v vs the live hook_z, relative to max |z| (float32: ~1e-7 measured on the tiny models)
Z_RTOL = 1e-4


def tolerance(base: float, dtype: torch.dtype) -> float:
    """``base``, or 4 rounding steps of the dtype the model ran in (bfloat16: 0.031, float16: 0.0039), whichever
    is larger: a model in bfloat16 rounds its own pattern and z that far from the float32 derivation."""
    return max(base, 4 * float(torch.finfo(dtype).eps))


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
    if not err <= tolerance(ATOL, cache[names[-1]].dtype):
        raise HeadstoreError(
            f"model {model.name!r}: softmax(q . k * {cfg.score_scale:.4g}) with a causal mask (and the recorded "
            f"soft-cap and sliding windows) differs from its attention pattern by {err:.2g} (ALiBi, attention sinks, "
            "a per-layer scale?): pattern cannot be derived, so keep it in --fields (e.g. default,q,k instead of compact)"
        )
    return err


def settle_derived(
    model: Any, tokens: np.ndarray, layers: Sequence[int], fields: tuple[str, ...], auto: bool
) -> tuple[str, ...]:
    """Check every field open_store will derive from ``fields`` (pattern from q, k; z as pattern @ v) against
    the live model on a few sequences. A mismatch under ``auto`` stores the field instead (pattern for q, k;
    z), with a notice; otherwise it is refused in one line."""
    # (field open_store would derive, its check, the fields it is derived from and no longer needs, notice)
    fallbacks: tuple[tuple[str, Callable[..., float], set[str], str], ...] = (
        ("pattern", check_pattern_derivable, {"q", "k"}, "pattern, not q and k"),
        ("z", check_z_derivable, set(), "z"),
    )
    for name, check, sources, notice in fallbacks:
        if name not in derived_fields(fields) or name in fields:
            continue
        try:
            check(model, tokens, layers)
        except HeadstoreError as e:
            if not auto:
                raise
            print(f"headstore: storing {notice}: {e}", file=sys.stderr)
            fields = tuple(n for n in FIELDS if n in (set(fields) - sources) | {name})
    return fields


@torch.inference_mode()
def check_z_derivable(model: Any, tokens: np.ndarray, layers: Sequence[int], n_check: int = 2) -> float:
    """Max abs difference between ``pattern @ v`` and the live ``hook_z`` on ``tokens[:n_check]``, relative to
    max |z|; raises past Z_RTOL."""
    names = [f"blocks.{L}.attn.hook_{x}" for L in layers for x in ("pattern", "v", "z")]
    x = torch.as_tensor(tokens[:n_check], dtype=torch.long, device=model.bridge.cfg.device)
    _, cache = families.run_with_cache(model, x, names)

    def stack(hook: str) -> np.ndarray:
        return np.stack([cache[f"blocks.{L}.attn.hook_{hook}"].float().cpu().numpy() for L in layers], axis=1)

    live = stack("z")
    err = float(np.abs(z_block(stack("pattern"), stack("v")) - live).max()) / max(float(np.abs(live).max()), 1e-30)
    if not err <= tolerance(Z_RTOL, cache[names[-1]].dtype):
        raise HeadstoreError(
            f"model {model.name!r}: pattern @ v differs from its attention output z by {err:.2g} of max |z|: "
            "z cannot be derived, so keep it in --fields (e.g. default)"
        )
    return err
