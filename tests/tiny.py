"""Tiny models and data for tests: a 2-layer Llama with a word-level tokenizer over digits and arithmetic."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<eos>", "<unk>", "<bos>"] + [str(i) for i in range(10)] + [
    "+", "=", "-", "?", "what", "is", "yes", "no", "the", "answer", "user", "assistant", ":", "\n",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} \n {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_tiny_config(**overrides))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def make_bf16_one_step_pair(seed: int = 0):
    """Base weights in [1, 1.9] (one bf16 spacing, 2^-7, everywhere) and a finetuned copy where every tensor's first
    20% of entries by a random order moved up by 0.6-1.4 spacings (each rounds to exactly one spacing: the rounded
    |Δ| ties) and the rest by under 0.4 (unchanged). Returns (base, finetuned, unrounded moves)."""
    generator = torch.Generator().manual_seed(seed)
    base, finetuned = make_tiny_model(seed=0), make_tiny_model(seed=0)
    moves = {}
    with torch.no_grad():
        for (name, before), after in zip(base.named_parameters(), finetuned.parameters()):
            before.copy_((1 + 0.9 * torch.rand(before.shape, generator=generator)).to(torch.bfloat16).float())
            n, order = before.numel(), torch.randperm(before.numel(), generator=generator)
            share = 0.4 * torch.rand(n, generator=generator)
            changed = order[: n // 5]
            share[changed] = 0.6 + 0.8 * torch.rand(changed.numel(), generator=generator)
            moves[name] = share.view(before.shape) * 2.0**-7
            after.copy_(before + moves[name])
    return base, finetuned, moves


def save_tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    folder = Path(folder)
    make_tiny_model(seed, **overrides).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def prompt_dataset(n: int = 16, conversational: bool = False) -> Dataset:
    prompts = [f"what is {i % 10} + {(3 * i) % 10} ?" for i in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    return Dataset.from_dict({"prompt": prompts})


def length_reward(completions, **kwargs) -> list[float]:
    """Varies across samples of a group, so GRPO advantages are non-zero."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]
