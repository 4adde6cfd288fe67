"""One builder for every supported TRL trainer on the tiny Llama, so tests can be parametrised over trainers."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from tests.tiny import length_reward, make_tiny_config, make_tiny_tokenizer, prompt_dataset

TRAINERS = ("grpo", "gmpo", "rloo", "dpo", "sft", "kto", "reward", "online_dpo")
# Trainers whose loss is built from per-token log-probs (all but the reward model)
TOKEN_TRAINERS = tuple(name for name in TRAINERS if name != "reward")


def preference_dataset(n: int = 8) -> Dataset:
    # Completions start with a space: the word-level tokenizer splits on whitespace only
    return Dataset.from_dict({
        "prompt": [f"what is {i % 10} + 1 ?" for i in range(n)],
        "chosen": [f" the answer is {(i + 1) % 10}" for i in range(n)],
        "rejected": [f" no {(i + 5) % 10} {(i + 3) % 10}" for i in range(n)],
    })


def kto_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({
        "prompt": [f"what is {i % 10} + 1 ?" for i in range(n)],
        "completion": [f" the answer is {(i + 1) % 10}" if i % 2 else f" no {(i + 5) % 10}" for i in range(n)],
        "label": [bool(i % 2) for i in range(n)],
    })


def sft_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"text": [f"what is {i % 10} + 1 ? the answer is {(i + 1) % 10}" for i in range(n)]})


def reward_dataset(n: int = 8) -> Dataset:
    return preference_dataset(n).remove_columns("prompt")


def tiny_reward_model(seed: int = 1, dtype: torch.dtype | None = None) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(make_tiny_config(num_labels=1))
    return model.to(dtype) if dtype is not None else model


def build_trainer(name: str, checkpoint: Path, output_dir: Path, *, from_name: bool = False,
                  dtype: torch.dtype | None = None, model: torch.nn.Module | None = None,
                  trainer_kwargs: dict | None = None, **overrides):
    """A 2-step, fp32-compute, CPU trainer of kind ``name`` on the tiny model saved in ``checkpoint``.

    ``from_name`` passes the checkpoint path as a string so the trainer loads the model itself; ``dtype`` sets the
    weights' dtype (bf16 weights exercise MaskedAdamW's master copies); ``model`` is a policy loaded beforehand (for
    constructor arguments built from it, e.g. ``optimizers`` or ``ref_model``); ``trainer_kwargs`` go to the
    trainer's constructor (e.g. ``peft_config``) and ``overrides`` to its config.
    """
    import trl

    tokenizer = make_tiny_tokenizer()
    args = dict(output_dir=str(output_dir), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
                use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0)
    if name in ("grpo", "gmpo", "rloo"):
        args.update(num_generations=4, max_completion_length=6, temperature=1.0)
    if name == "online_dpo":
        args.update(max_new_tokens=6, per_device_train_batch_size=2)
    args.update(overrides)
    if from_name:
        args["model_init_kwargs"] = {"dtype": dtype} if dtype is not None else None

    if model is not None and (from_name or dtype is not None or name == "reward"):
        raise ValueError("model= is a loaded causal LM policy: it excludes from_name, dtype and the reward case")

    def policy():
        if model is not None:
            return model
        if from_name:
            return str(checkpoint)
        return AutoModelForCausalLM.from_pretrained(checkpoint, **({"dtype": dtype} if dtype is not None else {}))

    common = dict(processing_class=tokenizer, **(trainer_kwargs or {}))
    if name == "grpo":
        return trl.GRPOTrainer(model=policy(), reward_funcs=length_reward, args=trl.GRPOConfig(**args),
                               train_dataset=prompt_dataset(), **common)
    if name == "gmpo":
        from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

        return GMPOTrainer(model=policy(), reward_funcs=length_reward, args=GMPOConfig(**args),
                           train_dataset=prompt_dataset(), **common)
    if name == "rloo":
        return trl.RLOOTrainer(model=policy(), reward_funcs=length_reward, args=trl.RLOOConfig(**args),
                               train_dataset=prompt_dataset(), **common)
    if name == "dpo":
        return trl.DPOTrainer(model=policy(), args=trl.DPOConfig(**args), train_dataset=preference_dataset(),
                              **common)
    if name == "sft":
        return trl.SFTTrainer(model=policy(), args=trl.SFTConfig(**args), train_dataset=sft_dataset(), **common)
    if name == "kto":
        return trl.KTOTrainer(model=policy(), args=trl.KTOConfig(**args), train_dataset=kto_dataset(), **common)
    if name == "reward":
        if from_name:
            raise ValueError("the reward case builds its sequence-classification model in memory")
        return trl.RewardTrainer(model=tiny_reward_model(dtype=dtype), args=trl.RewardConfig(**args),
                                 train_dataset=reward_dataset(), **common)
    if name == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        return OnlineDPOTrainer(model=policy(), reward_funcs=tiny_reward_model(), args=OnlineDPOConfig(**args),
                                train_dataset=prompt_dataset(), reward_processing_classes=tokenizer, **common)
    raise ValueError(f"unknown trainer {name!r}; choose from {TRAINERS}")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_entries(before: dict[str, torch.Tensor], model: torch.nn.Module, mask, selected: bool) -> int:
    """How many entries inside (``selected=True``) or outside the mask differ bitwise from ``before``."""
    total = 0
    for name, param in model.named_parameters():
        differs = param.detach() != before[name]
        chosen = mask[name] if name in mask else torch.zeros_like(differs)
        total += int((differs & (chosen if selected else ~chosen)).sum())
    return total
