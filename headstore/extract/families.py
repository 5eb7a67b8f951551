"""What differs between attention architectures, read from the booted model: the non-linearities a store's
analyzers must apply, the fields a family's structure cannot represent, and the hooks TransformerBridge lacks.

TransformerBridge 4.3 boots every family headstore is tested on (``docs/families.md``), but not every one with
the same hooks: GPT-NeoX and Phi-3 have no ``hook_rot_q``/``hook_rot_k`` (post-rotary queries and keys), GPT-J
has neither those nor ``hook_cos``/``hook_sin``, and GPT-J and OPT cannot compute ``hook_result``. Where a hook
is missing, :func:`run_with_cache` computes its tensor exactly from what the bridge has:

- post-rotary ``q``/``k`` from the pre-rotary ``hook_q``/``hook_k`` and the model's own rotary tables (partial
  rotary: the first ``rotary_dim`` dims rotate, the rest pass through; GPT-J rotates interleaved pairs), the
  formula of the model's own ``apply_rotary_pos_emb``;
- per-head ``result`` as ``z @ W_O[layer]``, which is how the bridge computes it where it can.

:func:`read_traits` records the model's own non-linearities in the store's ``model.config`` (final-logit and
attention soft-caps, the attention scale, sliding windows and the layers that use them, per-head q/k norms,
parallel residual, rotary dims and style, pre- and post-norms), so analyzers apply them or refuse.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from headstore.store_schema import HeadstoreError

# HF architecture -> the family name used in messages and docs/families.md.
FAMILIES = {
    "GPT2LMHeadModel": "GPT-2",
    "LlamaForCausalLM": "Llama",
    "GPTNeoXForCausalLM": "GPT-NeoX",
    "GPTJForCausalLM": "GPT-J",
    "OPTForCausalLM": "OPT",
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma-2",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3",
    "MistralForCausalLM": "Mistral",
    "Phi3ForCausalLM": "Phi-3",
    "Olmo2ForCausalLM": "OLMo-2",
}
# Families whose rotary embedding turns adjacent pairs (x0, x1), (x2, x3)... (``rotate_every_two``) instead of
# the two halves of the rotated dims (``rotate_half``).
INTERLEAVED_ROTARY = ("GPTJForCausalLM", "CodeGenForCausalLM")


def family_label(architecture: str) -> str:
    """``"GPT-J (GPTJForCausalLM)"``; an architecture headstore has no name for is shown as itself."""
    name = FAMILIES.get(architecture)
    return f"{name} ({architecture})" if name else architecture or "this model"


def hf_attention(bridge: Any, layer: int) -> Any:
    """The Hugging Face attention module of ``layer`` under the bridge."""
    return bridge.blocks[layer].attn.original_component


def _positive(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and x > 0 else 0.0


def read_traits(bridge: Any, hf_config: Any, hooks: frozenset[str]) -> dict[str, Any]:
    """The model's non-linearities and structure, as ``ModelConfig`` fields (see its docstring)."""
    cfg = bridge.cfg
    n_layers, d_head = int(cfg.n_layers), int(cfg.d_head)
    arch = str(getattr(cfg, "architecture", "") or "")
    attn0 = hf_attention(bridge, 0)
    scale = getattr(attn0, "scaling", None)
    window, window_layers = _sliding_windows(bridge, hf_config, n_layers)
    rotary = str(cfg.positional_embedding_type) == "rotary"
    return {
        "final_logit_softcap": _positive(getattr(hf_config, "final_logit_softcapping", None)),
        "attn_logit_softcap": _positive(getattr(hf_config, "attn_logit_softcapping", None)),
        "attn_scale": float(scale) if isinstance(scale, int | float) and scale > 0 else float(d_head**-0.5),
        "sliding_window": window,
        "sliding_window_layers": window_layers,
        "qk_norm": _qk_norm_kind(attn0, d_head),
        "parallel_residual": bool(getattr(cfg, "parallel_attn_mlp", False)),
        "rotary_dim": _rotary_dim(bridge, hf_config, d_head) if rotary else 0,
        "rotary_style": "interleaved" if arch in INTERLEAVED_ROTARY else "half",
        "pre_norm": "blocks.0.ln1.hook_scale" in hooks,
        "post_norm": "blocks.0.ln1_post.hook_scale" in hooks,
    }


def _sliding_windows(bridge: Any, hf_config: Any, n_layers: int) -> tuple[int, list[int]]:
    """(window, layers using it): a layer's attention module's own ``sliding_window`` (Gemma-2), else the
    config's ``layer_types`` and ``sliding_window`` (Mistral, Qwen2 with ``use_sliding_window``)."""
    per_layer = [getattr(hf_attention(bridge, L), "sliding_window", None) for L in range(n_layers)]
    if any(isinstance(w, int) and w > 0 for w in per_layer):
        sizes = {int(w) for w in per_layer if isinstance(w, int) and w > 0}
        if len(sizes) > 1:
            raise HeadstoreError(f"layers use different sliding windows {sorted(sizes)}: headstore records one")
        return sizes.pop(), [L for L, w in enumerate(per_layer) if isinstance(w, int) and w > 0]
    window = getattr(hf_config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(hf_config, "use_sliding_window", True) is False:
        return 0, []
    types = getattr(hf_config, "layer_types", None)
    if types:
        return int(window), [L for L, t in enumerate(types) if t == "sliding_attention"]
    return int(window), list(range(n_layers))


def _qk_norm_kind(attn: Any, d_head: int) -> str:
    norm = getattr(attn, "q_norm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return ""
    return "per_head" if weight.numel() == d_head else "full"


def _rotary_dim(bridge: Any, hf_config: Any, d_head: int) -> int:
    attn0 = hf_attention(bridge, 0)
    for name in ("rotary_ndims", "rotary_dim"):
        v = getattr(attn0, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(hf_config, "rotary_dim", None)
    if isinstance(v, int) and v > 0:
        return v
    for name in ("partial_rotary_factor", "rotary_pct"):
        f = getattr(hf_config, name, None)
        if isinstance(f, int | float) and 0 < f < 1:
            return int(d_head * f)
    return d_head


@torch.inference_mode()
def firing_hooks(bridge: Any) -> frozenset[str]:
    """Every hook name that fires in a forward pass (aliases included): a two-token probe, block 0's names
    repeated for every layer. ``bridge.hook_dict`` also lists hooks that never fire (Phi-3's ``hook_rot_q``)."""
    toks = torch.zeros((1, 2), dtype=torch.long, device=bridge.cfg.device)
    with warnings.catch_warnings():  # "skipped gated-off hook names": those do not fire, as wanted
        warnings.simplefilter("ignore")
        _, cache = bridge.run_with_cache(
            toks, names_filter=lambda n: not n.startswith("blocks.") or n.startswith("blocks.0.")
        )
    names = set(cache.keys())
    for name in list(names):
        if name.startswith("blocks.0."):
            names.update(name.replace("blocks.0.", f"blocks.{L}.", 1) for L in range(int(bridge.cfg.n_layers)))
    return frozenset(names)


# ---------------------------------------------------------------------------------------------- fields


# Fields only some families have: left out of a preset silently where the model has no such part.
FAMILY_FIELDS = ("ln1_post_scale",)


def unrepresentable_fields(hooks: frozenset[str], architecture: str) -> dict[str, str]:
    """Field -> why this model's structure cannot represent it (empty for most families)."""
    out: dict[str, str] = {}
    if "blocks.0.ln1.hook_scale" not in hooks:
        reason = "has no norm before attention or the MLP (post-norm blocks)"
        out["ln1_scale"] = out["ln2_scale"] = reason
    elif "blocks.0.ln2.hook_scale" not in hooks:
        out["ln2_scale"] = "feeds attention and the MLP from one norm, ln1 (its scale is ln1_scale)"
    if "blocks.0.ln1_post.hook_scale" not in hooks:
        out["ln1_post_scale"] = "has no norm on the attention output (not a post-norm model)"
    return out


def resolve_fields(named: frozenset[str], fields: tuple[str, ...], model: Any) -> tuple[str, ...]:
    """``fields`` less what ``model`` cannot represent.

    A field among ``named`` (asked for by name) that the model cannot represent is refused in one line naming the field and the
    family; one that came from a preset (``default``, ``all``, ``compact``) is left out, with a one-line
    notice unless it is a part only some families have (``FAMILY_FIELDS``).
    """
    missing = model.unrepresentable
    label = family_label(model.architecture)
    for name in fields:
        if name in missing and name in named:
            raise HeadstoreError(f"--fields {name}: {label} {missing[name]}: leave {name} out of --fields")
    dropped = [n for n in fields if n in missing and n not in FAMILY_FIELDS]
    if dropped:
        print(f"headstore: not storing {', '.join(dropped)}: {label} {missing[dropped[0]]}", file=sys.stderr)
    return tuple(n for n in fields if n not in missing)


# ---------------------------------------------------------------------------------------------- hooks


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """HF rotary embedding of ``x`` (batch, pos, head, d_head) with tables (pos, d_rot) on its first d_rot dims.

    ``half``: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` (Llama, GPT-NeoX, Phi-3);
    ``interleaved``: ``rotate_every_two(x) = stack(-x[1::2], x[::2])`` interleaved (GPT-J; tables repeated
    pairwise). Dims past d_rot pass through.
    """
    d_rot = cos.shape[-1]
    part, rest = x[..., :d_rot], x[..., d_rot:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    if style == "interleaved":
        turned = torch.stack((-part[..., 1::2], part[..., ::2]), dim=-1).flatten(-2)
    else:
        half = d_rot // 2
        turned = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    return torch.cat(((part * c) + (turned * s), rest), dim=-1)


@torch.inference_mode()
def rotary_tables(model: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (pos, d_rot) as the model applies them: ``blocks.0.attn.hook_cos/sin`` where the bridge has them,
    else the ``position_embeddings`` the model hands its first attention layer (GPT-J's (sin, cos) of d_rot/2,
    repeated pairwise as its ``apply_rotary_pos_emb`` does)."""
    key = ("rotary", seq_len)
    if key in model.memo:
        return model.memo[key]
    bridge = model.bridge
    toks = torch.zeros((1, seq_len), dtype=torch.long, device=bridge.cfg.device)
    if "blocks.0.attn.hook_cos" in model.hooks:
        names = ["blocks.0.attn.hook_cos", "blocks.0.attn.hook_sin"]
        _, cache = bridge.run_with_cache(toks, names_filter=names, stop_at_layer=1)
        cos, sin = (cache[n] for n in names)
        tables = cos.reshape(-1, cos.shape[-1])[-seq_len:].float(), sin.reshape(-1, sin.shape[-1])[-seq_len:].float()
    else:
        got: dict[str, Any] = {}

        def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            got.setdefault("pe", kwargs.get("position_embeddings"))

        handle = hf_attention(bridge, 0).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            bridge(toks, stop_at_layer=1)
        finally:
            handle.remove()
        pe = got.get("pe")
        if not isinstance(pe, tuple) or len(pe) != 2 or model.traits["rotary_style"] != "interleaved":
            raise HeadstoreError(
                f"{family_label(model.architecture)}: cannot read the model's rotary tables (no hook_cos and no "
                "position_embeddings handed to its attention): q and k cannot be stored post-rotary"
            )
        sin, cos = (t.reshape(-1, t.shape[-1])[-seq_len:].float() for t in pe)
        tables = torch.repeat_interleave(cos, 2, dim=-1), torch.repeat_interleave(sin, 2, dim=-1)
    model.memo[key] = tables
    return tables


def run_hooked(
    model: Any, x: torch.Tensor, names: Sequence[str], take: Callable[[str, torch.Tensor], None]
) -> torch.Tensor:
    """One forward pass of ``x``; ``take(name, tensor)`` receives each of ``names`` (TransformerLens hook names) as
    it fires, and the logits are returned. The hooks this bridge lacks (``attn.hook_rot_q/rot_k``,
    ``attn.hook_result``) are computed from what it has, inside the hook of their source.

    Nothing is cached: ``take`` copies what it keeps, so the model's activations are freed layer by layer as in a
    plain forward (what ``run_with_cache`` costs instead: docs/benchmarks.md, "Figures behind extract's code")."""
    hooks = model.hooks
    derived: dict[str, list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]] = {}
    real_result, w_o = False, None
    for name in names:
        if name in hooks and not (name.endswith("attn.hook_result") and not model.has_result_hook):
            derived.setdefault(name, []).append((name, _same))
            real_result |= name.endswith("attn.hook_result")
        elif name.endswith(("attn.hook_rot_q", "attn.hook_rot_k")) and model.rotary:
            cos, sin = rotary_tables(model, x.shape[1])  # before the forward: it runs the model itself
            turn = functools.partial(
                rotate, cos=cos.to(x.device), sin=sin.to(x.device), style=model.traits["rotary_style"]
            )
            derived.setdefault(name.replace("hook_rot_", "hook_"), []).append((name, turn))
        elif name.endswith("attn.hook_result"):
            w_o = model.bridge.W_O if w_o is None else w_o  # (layer, head, d_head, d_model), built once
            per_layer = functools.partial(_result, w_o=w_o[int(name.split(".")[1])])
            derived.setdefault(name.replace("hook_result", "hook_z"), []).append((name, per_layer))
        else:
            raise HeadstoreError(f"{family_label(model.architecture)} has no hook {name!r}")

    def hook(t: torch.Tensor, hook: Any, outs: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]) -> None:
        t = _unflatten(t, x.shape)
        for name, f in outs:
            take(name, f(t))

    fwd = [(src, functools.partial(hook, outs=outs)) for src, outs in sorted(derived.items())]
    with attn_result(model.bridge, real_result):  # on only where the bridge has hook_result (real_result)
        logits: torch.Tensor = model.bridge.run_with_hooks(x, fwd_hooks=fwd, return_type="logits")
    return logits


def run_with_cache(model: Any, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`run_hooked` keeping every tensor (as ``bridge.run_with_cache(x, names_filter=names)`` does)."""
    cache: dict[str, torch.Tensor] = {}
    logits = run_hooked(model, x, names, cache.__setitem__)
    return logits, cache


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _result(z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Per-head result (batch, pos, head, d_model) = z @ W_O, how the bridge computes it where it can."""
    return torch.einsum("bphd,hdm->bphm", z, w_o.to(z.dtype))


@contextlib.contextmanager
def attn_result(bridge: Any, on: bool) -> Iterator[None]:
    """The bridge's per-head ``hook_result`` on or off for one call, as it was afterwards. On, the bridge computes
    every head's ``z_h @ W_O[h]`` and sums them instead of one ``o_proj`` (its cost: docs/benchmarks.md,
    "Figures behind extract's code"), so extraction turns it on only when ``result`` is stored. Off is a no-op on bridges that cannot turn it on."""
    was = bool(bridge.cfg.use_attn_result)
    if was == on:
        yield
        return
    bridge.set_use_attn_result(on)
    try:
        yield
    finally:
        bridge.set_use_attn_result(was)


def _unflatten(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """OPT runs its MLP half (``ln2``) on tokens flattened to (batch * pos, ...): give them back their axes."""
    b, p = shape
    if p > 1 and t.ndim >= 1 and t.shape[0] == b * p:  # every other hook leads with batch
        return t.reshape(b, p, *t.shape[1:])
    return t
