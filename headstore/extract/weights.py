"""Processed weights read from the bridge (after folding/centring), as float32 numpy arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import numpy as np
import torch

from headstore.extract import families, norms
from headstore.extract.models import LoadedModel
from headstore.store_schema.hashing import weights_sha256 as weights_sha256  # its home; extract.run imports it here


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
    if m.processing.get("ln_final_folded"):  # the bridge could not fold ln_final (OLMo-2): fold it here
        affine = norms.norm_affine(b.ln_final, dm, cfg["normalization_type"])
        if affine is not None:
            gain, bias = affine
            out["b_U"] = (out["b_U"] + bias.astype(np.float64) @ out["W_U"]).astype(np.float32)
            out["W_U"] = (gain[:, None] * out["W_U"]).astype(np.float32)
    if m.rotary:
        cos, sin = rotary_tables(m, seq_len)
        out["rotary_cos"], out["rotary_sin"] = cos, sin
    else:
        out["W_pos"] = _np(b.W_pos)
    if m.traits.get("qk_norm"):
        out["q_norm_w"] = norms.qk_norm_gain(m, idx, "q")
        out["k_norm_w"] = norms.qk_norm_gain(m, idx, "k")
    if m.traits.get("post_norm"):
        out["ln1_post_w"] = norms.post_norm_gain(m, idx)
    return out


def rotary_tables(m: LoadedModel, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (pos, d_rot) as the model applies them (``families.rotary_tables``)."""
    cos, sin = families.rotary_tables(m, seq_len)
    return _np(cos), _np(sin)


@torch.inference_mode()
def effective_embedding(m: LoadedModel, chunk: int = 4096) -> np.ndarray:
    """Seed's ``get_effective_embedding_2(model)["W_E (including MLPs)"]``.

    ``resid_mid = E + sum_head ln1_0(E) @ W_V[0, kv(head)] @ W_O[0, head]`` (no biases, as the seed),
    ``W_EE = resid_mid + MLP0(ln2_0(resid_mid))``, with ``E`` the embedding as it enters the residual stream
    (Gemma's ``sqrt(d_model)`` included). Per family: a parallel block's MLP reads ``E`` (GPT-NeoX, GPT-J;
    GPT-J's MLP reads ln1), a block without pre-norms reads its input raw and post-norms (Gemma-2, OLMo-2)
    normalise the attention and MLP outputs before they are added.
    """
    b = m.bridge
    block = b.blocks[0]
    group = b.cfg.n_heads // (b.cfg.n_key_value_heads or b.cfg.n_heads)
    W_V = torch.repeat_interleave(b.W_V[0], group, dim=0)  # (head, d_model, d_head)
    W_O = b.W_O[0]
    has = {name: f"blocks.0.{name}.hook_scale" in m.hooks for name in ("ln1", "ln2", "ln1_post", "ln2_post")}
    ln2 = block.ln2 if has["ln2"] else block.ln1 if has["ln1"] else None
    parallel = bool(m.traits.get("parallel_residual"))
    rows = []
    n_vocab = int(b.W_E.shape[0])
    for start in range(0, n_vocab, chunk):
        ids = torch.arange(start, min(start + chunk, n_vocab), device=W_O.device)
        resid = b.embed(ids.unsqueeze(0))
        pre = block.ln1(resid) if has["ln1"] else resid
        attn_out = einops.einsum(pre, W_V, W_O, "b s dm, h dm dh, h dh dmo -> b s dmo")
        if has["ln1_post"]:
            attn_out = block.ln1_post(attn_out)
        resid_mid = resid + attn_out
        mlp_in = resid if parallel else resid_mid
        mlp_out = _mlp(block, ln2(mlp_in) if ln2 is not None else mlp_in)
        if has["ln2_post"]:
            mlp_out = block.ln2_post(mlp_out)
        rows.append(_np((resid_mid + mlp_out)[0]))
    return np.concatenate(rows, axis=0)


def _mlp(block: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP on ``x``; OPT's has no module of its own (fc1, activation, fc2 sit in the layer)."""
    if getattr(block.mlp, "name", "") is None and hasattr(block.mlp, "in") and hasattr(block.mlp, "out"):
        act = block.original_component.activation_fn
        return block.mlp.out(act(getattr(block.mlp, "in")(x)))
    return block.mlp(x)


def vocab_strings(tokenizer: Any, d_vocab: int) -> np.ndarray:
    """Each token id decoded on its own ('' past the tokenizer's vocabulary), as numpy StringDType: a fixed-width
    ``str`` array would drop trailing NULs (GPT-2's byte token 0 decodes to ``'\\x00'``)."""
    n = min(len(tokenizer), d_vocab)
    strings = tokenizer.batch_decode([[i] for i in range(n)])
    return np.array(list(strings) + [""] * (d_vocab - n), dtype=np.dtypes.StringDType())
