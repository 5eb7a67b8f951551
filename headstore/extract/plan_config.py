"""A plan from a model's ``config.json`` alone: no weights, no tokenizer, no data, nothing downloaded.

``headstore extract --model bench/configs/gemma-2-2b --dry-run --seq-len 1024 --n-tokens 10000000`` plans a GPU
job before a GPU is lent. The store's dim sizes come from the Hugging Face config (layers, heads, key-value
heads, head and model width, vocabulary, context), and the plan is ``extract.plan.make_plan``'s for a store of
``ceil(n_tokens / seq_len)`` sequences of ``seq_len`` tokens: per field, exact bytes for the uncompressed
fields, ``pattern`` at its causal non-zero fraction (what LZ4 leaves), files and disk. Weights are counted from
their shapes; the vocabulary strings, which need the tokenizer, at ``VOCAB_STRING_BYTES`` each.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstore.extract.auto import auto_fields
from headstore.extract.plan import Plan, make_plan
from headstore.extract.request import ExtractRequest, resolve_layers
from headstore.store_schema import HeadstoreError, Provenance
from headstore.store_schema.layout import SCHEMA_VERSION

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.ckpt")
LEARNED_POSITIONS = ("gpt2", "opt", "gpt_neo", "gpt_bigcode")  # model_type: W_pos, no rotary
POST_NORM = ("gemma2", "gemma3", "gemma3_text", "olmo2")  # a norm on the attention output: ln1_post_scale
NO_PRE_NORM = ("olmo2",)  # post-norm blocks only: no ln1_scale / ln2_scale
QK_NORM = ("qwen3", "olmo2", "gemma3", "gemma3_text")  # per-head q/k norms: q_norm_w, k_norm_w weights
ONE_NORM = ("gptj", "phi", "codegen")  # attention and the MLP read one norm, ln1: no ln2_scale
VOCAB_STRING_BYTES = 8  # a token string, Zstd-compressed (no tokenizer to read them from)


@dataclass(frozen=True)
class ConfigModel:
    """What ``families.resolve_fields`` reads of a model, from its config."""

    architecture: str
    unrepresentable: dict[str, str]


@dataclass(frozen=True)
class _Heads:
    """The head shape ``--fields auto`` reads (``headstore.extract.auto.HeadShape``), from a config."""

    n_heads: int
    n_key_value_heads: int
    d_head: int


def config_only(model: str) -> Path | None:
    """The ``config.json`` of a model given by its config alone (that file, or a folder holding one and no
    weight files); None for anything else (a name, a folder with weights)."""
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        return p
    if p.is_dir() and (p / "config.json").is_file() and not any(next(p.glob(g), None) for g in WEIGHT_FILES):
        return p / "config.json"
    return None


def read_config(path: Path) -> tuple[dict[str, Any], ConfigModel]:
    """The store's ``model.config`` shape keys from a Hugging Face ``config.json`` (read as JSON: nothing imported
    or fetched), and the fields its family cannot represent (as ``families.unrepresentable_fields`` finds on
    the booted model)."""
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
        kind = str(c.get("model_type", ""))
        n_heads, d_model = int(_key(c, "num_attention_heads", "n_head")), int(_key(c, "hidden_size", "n_embd"))
        d_head = int(c.get("head_dim") or d_model // n_heads)
        cfg = {
            "n_layers": int(_key(c, "num_hidden_layers", "n_layer", "num_layers")),
            "n_heads": n_heads,
            "n_key_value_heads": int(c.get("num_key_value_heads") or n_heads),
            "d_model": d_model,
            "d_head": d_head,
            "d_vocab": int(_key(c, "vocab_size")),
            "n_ctx": int(_key(c, "max_position_embeddings", "n_positions", "n_ctx")),
            "positional_embedding_type": "standard" if kind in LEARNED_POSITIONS else "rotary",
            "architecture": (c.get("architectures") or [kind])[0],
            "rotary_dim": 0 if kind in LEARNED_POSITIONS else _rotary_dim(c, d_head),
            "qk_norm": kind in QK_NORM,
            "post_norm": kind in POST_NORM,
        }
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise HeadstoreError(f"cannot read model config {path}: {e}") from None
    missing: dict[str, str] = {}
    if kind in NO_PRE_NORM:
        missing["ln1_scale"] = missing["ln2_scale"] = "has no norm before attention or the MLP (post-norm blocks)"
    elif kind in ONE_NORM:
        missing["ln2_scale"] = "feeds attention and the MLP from one norm, ln1 (its scale is ln1_scale)"
    if kind not in POST_NORM:
        missing["ln1_post_scale"] = "has no norm on the attention output (not a post-norm model)"
    return cfg, ConfigModel(cfg["architecture"], missing)


def _key(c: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` in the config (Hugging Face's names differ between families)."""
    for name in names:
        if c.get(name) is not None:
            return c[name]
    raise ValueError(f"it has no {' or '.join(names)}")


def _rotary_dim(c: dict[str, Any], d_head: int) -> int:
    """Rotated dims per head: ``rotary_dim`` (GPT-J), ``rotary_pct`` (GPT-NeoX), ``partial_rotary_factor``."""
    if c.get("rotary_dim"):
        return int(c["rotary_dim"])
    frac = c.get("rotary_pct") or c.get("partial_rotary_factor") or 1.0
    return int(d_head * float(frac))


def config_weights(cfg: dict[str, Any], layers: tuple[int, ...], seq_len: int) -> dict[str, np.ndarray]:
    """The float32 weights a store of this model holds (``extract.weights.collect_weights``' shapes), as
    zero-stride arrays: their sizes without their values."""
    h, kv, dh, dm, dv = (cfg[k] for k in ("n_heads", "n_key_value_heads", "d_head", "d_model", "d_vocab"))
    n = len(layers)
    shapes: dict[str, tuple[int, ...]] = {
        "W_E": (dv, dm), "W_Q": (n, h, dm, dh), "W_K": (n, kv, dm, dh), "W_V": (n, kv, dm, dh),
        "W_O": (n, h, dh, dm), "b_Q": (n, h, dh), "b_K": (n, kv, dh), "b_V": (n, kv, dh), "b_O": (n, dm),
        "W_U": (dm, dv), "b_U": (dv,),
    }  # fmt: skip
    if cfg["positional_embedding_type"] == "rotary":
        shapes["rotary_cos"] = shapes["rotary_sin"] = (seq_len, cfg["rotary_dim"])
    else:
        shapes["W_pos"] = (cfg["n_ctx"], dm)
    if cfg["qk_norm"]:
        shapes["q_norm_w"], shapes["k_norm_w"] = (n, h, dh), (n, kv, dh)
    if cfg["post_norm"]:
        shapes["ln1_post_w"] = (n, dm)
    if 0 in layers:
        shapes["W_EE"] = (dv, dm)
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def config_provenance(req: ExtractRequest, path: Path) -> Provenance:
    """The provenance a store of ``req`` would record for the model whose config is at
    ``path``: its fields, layers and dim sizes; what a config cannot give (tokenizer, data) left blank."""
    n_seq = req.n_sequences()
    if req.seq_len is None or n_seq is None:
        raise HeadstoreError(
            f"a plan from {path} alone (no weights) needs --seq-len and --n-tokens (or --n-seq): add them"
        )
    if req.grad is not None:
        raise HeadstoreError("--grad needs the model's weights to plan: give a model folder with weights")
    cfg, model = read_config(path)
    if req.seq_len > cfg["n_ctx"]:
        raise HeadstoreError(f"--seq-len {req.seq_len} is over the model's context of {cfg['n_ctx']} tokens: lower it")
    fields = _resolve_fields(req.named_fields(), req.selected_fields(), model)
    layers = resolve_layers("layers", req.layers, cfg["n_layers"])
    fields = auto_fields(req.fields, req.drop, fields, _Heads(cfg["n_heads"], cfg["n_key_value_heads"], cfg["d_head"]), req.seq_len,
                         req.pattern_layers == "all", tuple(model.unrepresentable))  # fmt: skip
    pattern_layers = None
    if "pattern" in fields:
        pl = req.pattern_layers
        pattern_layers = layers if pl == "all" else resolve_layers("pattern_layers", pl, cfg["n_layers"])
    return _provenance(req, path, cfg, fields, layers, pattern_layers, n_seq, req.seq_len)


def plan_from_config(req: ExtractRequest, path: Path) -> Plan:
    """The plan of ``req`` (a dry run) for the model whose config is at ``path``."""
    from headstore.store_schema.arrays import store_sizes

    prov = config_provenance(req, path)
    cfg, n_seq = prov.config, prov.dataset.n_sequences
    # token ids drawn uniformly: Zstd keeps about what it keeps of real text's ids (an upper bound)
    tokens = np.random.default_rng(0).integers(0, cfg["d_vocab"], (n_seq, prov.seq_len), dtype=np.int32)
    sizes = store_sizes(cfg, prov, n_seq)
    weights = config_weights(cfg, prov.layers, prov.seq_len)
    plan = make_plan(req.out or "(no --out)", prov, sizes, tokens, {}, weights)
    vocab = cfg["d_vocab"] * VOCAB_STRING_BYTES
    basis = f"from {path.name} alone: field sizes from shapes, no weights, tokenizer or data read"
    return dataclasses.replace(plan, weights_bytes=plan.weights_bytes + vocab, weights_files=plan.weights_files + 2,
                               basis=basis, block=_block(req.out))  # fmt: skip


def _resolve_fields(named: frozenset[str], fields: tuple[str, ...], model: ConfigModel) -> tuple[str, ...]:
    """``families.resolve_fields`` without torch: a field named that the family cannot represent is refused, one
    from a preset left out (with the same notice, unless only some families have it)."""
    missing = model.unrepresentable
    for name in fields:
        if name in missing and name in named:
            raise HeadstoreError(f"--fields {name}: {model.architecture} {missing[name]}: leave {name} out of --fields")
    dropped = [n for n in fields if n in missing and n != "ln1_post_scale"]
    if dropped:
        print(
            f"headstore: not storing {', '.join(dropped)}: {model.architecture} {missing[dropped[0]]}", file=sys.stderr
        )
    return tuple(n for n in fields if n not in missing)


def _provenance(req: ExtractRequest, path: Path, cfg: dict[str, Any], fields: tuple[str, ...], layers: tuple[int, ...],
                pattern_layers: tuple[int, ...] | None, n_seq: int, seq_len: int) -> Provenance:  # fmt: skip
    """The provenance the store would record, with what a config cannot give (tokenizer, data) left blank."""
    from headstore.store_schema.provenance_parts import DatasetInfo, ModelInfo, TokenizerInfo

    model = ModelInfo(name=str(path), source={"kind": "config"}, config=cfg, processing={}, weights_sha256="")
    tok = TokenizerInfo(name="", bos_token_id=None, pad_token_id=None, vocab_size=cfg["d_vocab"], vocab_sha256="")
    data = DatasetInfo(kind="plan", spec="", options={}, n_sequences=n_seq, sha256="")
    return Provenance(
        schema_version=SCHEMA_VERSION,
        model=model,
        tokenizer=tok,
        dataset=data,
        prepend_bos=req.prepend_bos,
        seq_len=seq_len,
        storage_dtype=req.dtype,
        fields=fields,
        layers=layers,
        batch_size=req.batch_size,
        pattern_layers=pattern_layers,
        layout=req.layout,
    )


def _block(out: str) -> int:
    """The filesystem block of ``out``'s nearest existing folder (4096 with no ``--out``)."""
    import os

    from headstore.extract.space import existing

    return os.statvfs(existing(out)).f_bsize if out else 4096
