"""Random-init tiny GPT-2 and Llama (RMSNorm, rotary, grouped-query) models with a small BPE tokenizer.

Norm gains and biases are randomised so that LayerNorm folding is really exercised.
"""

from __future__ import annotations

from pathlib import Path

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
            GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
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
