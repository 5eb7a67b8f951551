"""Processed weights read from the bridge (after folding/centring), as float32 numpy arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import einops
import numpy as np
import torch

from headstore.extract.models import LoadedModel


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _bias_or_zeros(bridge: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        value = getattr(bridge, name)
    except AttributeError:
        return torch.zeros(shape)
    return value if value is not None else torch.zeros(shape)


@torch.inference_mode()
def collect_weights(m: LoadedModel, layers: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """Every weight the analyzers read, restricted to ``layers`` (W_EE is computed separately)."""
    b, cfg = m.bridge, m.config_dict()
    n_l, h, kv, dh, dm = cfg["n_layers"], cfg["n_heads"], cfg["n_key_value_heads"], cfg["d_head"], cfg["d_model"]
    idx = list(layers)
    out: dict[str, np.ndarray] = {
        "W_E": _np(b.W_E),
        "W_Q": _np(b.W_Q[idx]),
        "W_K": _np(b.W_K[idx]),
        "W_V": _np(b.W_V[idx]),
        "W_O": _np(b.W_O[idx]),
        "b_Q": _np(_bias_or_zeros(b, "b_Q", (n_l, h, dh))[idx]),
        "b_K": _np(_bias_or_zeros(b, "b_K", (n_l, kv, dh))[idx]),
        "b_V": _np(_bias_or_zeros(b, "b_V", (n_l, kv, dh))[idx]),
        "b_O": _np(_bias_or_zeros(b, "b_O", (n_l, dm))[idx]),
        "W_U": _np(b.W_U),
        "b_U": _np(b.b_U),
    }
    if m.rotary:
        cos, sin = rotary_tables(m, seq_len)
        out["rotary_cos"], out["rotary_sin"] = cos, sin
    else:
        out["W_pos"] = _np(b.W_pos)
    return out


@torch.inference_mode()
def rotary_tables(m: LoadedModel, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (pos, d_head) as the model applies them, read from ``blocks.0.attn.hook_cos/sin``."""
    toks = torch.zeros((1, seq_len), dtype=torch.long, device=m.bridge.cfg.device)
    names = ["blocks.0.attn.hook_cos", "blocks.0.attn.hook_sin"]
    _, cache = m.bridge.run_with_cache(toks, names_filter=names, stop_at_layer=1)  # block 0 is enough
    cos, sin = cache["blocks.0.attn.hook_cos"], cache["blocks.0.attn.hook_sin"]
    return _np(cos.reshape(-1, cos.shape[-1])[-seq_len:]), _np(sin.reshape(-1, sin.shape[-1])[-seq_len:])


@torch.inference_mode()
def effective_embedding(m: LoadedModel, chunk: int = 4096) -> np.ndarray:
    """Seed's ``get_effective_embedding_2(model)["W_E (including MLPs)"]``.

    ``resid_mid = W_E + sum_head ln1_0(W_E) @ W_V[0, kv(head)] @ W_O[0, head]`` (no biases, as the
    seed), ``W_EE = resid_mid + MLP0(ln2_0(resid_mid))``.
    """
    b = m.bridge
    block = b.blocks[0]
    group = b.cfg.n_heads // (b.cfg.n_key_value_heads or b.cfg.n_heads)
    W_V = torch.repeat_interleave(b.W_V[0], group, dim=0)  # (head, d_model, d_head)
    W_O = b.W_O[0]
    W_E = b.W_E
    rows = []
    for start in range(0, W_E.shape[0], chunk):
        resid = W_E[start : start + chunk].unsqueeze(0)
        pre = block.ln1(resid)
        attn_out = einops.einsum(pre, W_V, W_O, "b s dm, h dm dh, h dh dmo -> b s dmo")
        resid_mid = resid + attn_out
        mlp_out = block.mlp(block.ln2(resid_mid))
        rows.append(_np((resid_mid + mlp_out)[0]))
    return np.concatenate(rows, axis=0)


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        if name == "W_EE":
            continue  # a function of the others
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name]).tobytes())
    return h.hexdigest()


def vocab_strings(tokenizer: Any, d_vocab: int) -> np.ndarray:
    """Each token id decoded on its own ('' past the tokenizer's vocabulary)."""
    n = min(len(tokenizer), d_vocab)
    strings = tokenizer.batch_decode([[i] for i in range(n)])
    return np.asarray(list(strings) + [""] * (d_vocab - n))
