"""Random-init tiny GPT-2 and Llama (RMSNorm, rotary, grouped-query) models with a small BPE tokenizer.

Norm gains and biases are randomised so that LayerNorm folding is really exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headstore.extract.data.ioi_prompts import corpus_lines

CODE_LINES = (
    "x = a if b else c",
    "value = default if value is None else value",
    "if x > 0:\n    return x\nelse:\n    return -x",
    "def f(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
)


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus_lines() + list(CODE_LINES) * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)


def build_tiny(name: str, folder: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(1234)
    model: torch.nn.Module
    if name == "tiny-gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
            )
        )  # fmt: skip
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "ln" in pname or "norm" in pname:
                if pname.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.1)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)  # type: ignore[operator]


# Random tiny configs of every attention family the matrix tests (tests/test_families.py, docs/families.md):
# 2 layers, d_model 32, 4 heads of 8 dims, grouped-query attention where the family has it, each family's own
# non-linearities switched on (partial rotary, sliding windows, soft-caps, q/k norms, post-norms).
TINY_FAMILIES = (
    "gpt2", "llama", "gpt-neox", "gpt-j", "opt", "gemma", "gemma-2", "qwen2", "qwen3", "mistral", "phi-3", "olmo-2",
)  # fmt: skip


def _extra(**kw: Any) -> dict[str, Any]:
    """Config keys the typed signatures of transformers 5 no longer list but still read (partial rotary)."""
    return kw


def family_config(family: str, vocab: int) -> object:
    """The ``transformers`` config of ``family``'s tiny model (see ``TINY_FAMILIES``)."""
    import transformers as T

    ids: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    dims: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 64, "initializer_range": 0.1}  # fmt: skip
    gqa: dict[str, Any] = {**dims, "num_key_value_heads": 2, "tie_word_embeddings": False}
    configs: dict[str, Callable[[], Any]] = {
        "gpt2": lambda: T.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1, **ids),
        "llama": lambda: T.LlamaConfig(**gqa, **ids),
        # partial rotary: transformers 5 still reads the checkpoints' rotary_pct / partial_rotary_factor
        "gpt-neox": lambda: T.GPTNeoXConfig(
            **dims, **_extra(rotary_pct=0.25), use_parallel_residual=True, tie_word_embeddings=False, **ids
        ),
        "gpt-j": lambda: T.GPTJConfig(
            n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, initializer_range=0.1, **ids
        ),
        "opt": lambda: T.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            word_embed_proj_dim=32, init_std=0.1, **ids,
        ),
        "gemma": lambda: T.GemmaConfig(**{**dims, "num_key_value_heads": 1, "head_dim": 8}, **ids),
        # soft-caps within reach of the scores and logits of these weights, a query scale other than 1/sqrt(8)
        "gemma-2": lambda: T.Gemma2Config(
            **{**dims, "initializer_range": 0.4}, num_key_value_heads=2, head_dim=8, sliding_window=4,
            query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **ids,
        ),
        "qwen2": lambda: T.Qwen2Config(**gqa, **ids),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=8, **ids),
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=4, **ids),
        "phi-3": lambda: T.Phi3Config(
            **gqa, **_extra(partial_rotary_factor=0.5), original_max_position_embeddings=64, **ids
        ),
        "olmo-2": lambda: T.Olmo2Config(**gqa, **ids),
    }  # fmt: skip
    if family not in configs:
        raise ValueError(f"unknown tiny family {family!r}: choose from {', '.join(TINY_FAMILIES)}")
    return configs[family]()


def build_family(family: str, folder: Path, tokenizer_folder: Path | None = None) -> None:
    """A random tiny model of ``family`` saved with headstore's tokenizer (copied from ``tokenizer_folder``
    when given, else trained) to ``folder``, loadable as ``--model FOLDER``. Norm gains are randomised (Gemma's
    ``1 + w`` around 1) and biases made non-zero, so that folding is really exercised."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_folder is None:
        build_tokenizer(folder)
    else:
        for p in tokenizer_folder.iterdir():
            if p.is_file():
                shutil.copy(p, folder / p.name)
    config = family_config(family, len(AutoTokenizer.from_pretrained(folder)))
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    offset = family.startswith("gemma")  # Gemma's RMSNorm multiplies by 1 + w
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "ln" in pname or "norm" in pname:
                if pname.endswith("weight"):
                    p.uniform_(-0.5, 0.5) if offset else p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.1)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
