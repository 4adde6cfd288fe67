"""The demo: GRPO on SmolLM2-135M-Instruct training only a 5% subnetwork (SparseConfig's default density), on CPU,
with a verifiable reward.

Task: few-shot addition ("2 + 3 = 5\\n...\\n{a} + {b} ="), reward 1 when the first integer of the completion is a+b.
With operands up to 19 the base model's sampled reward sits between 0 and 1, so GRPO groups have non-zero advantage.
The held-out prompts use addition pairs that never appear in training.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SparseConfig

FEW_SHOT = "2 + 3 = 5\n4 + 4 = 8\n1 + 6 = 7\n"
_FIRST_INTEGER = re.compile(r"-?\d+")


@dataclass
class DemoConfig:
    density: float = SparseConfig.density  # the library's default
    steps: int = 30
    max_operand: int = 19
    num_generations: int = 8
    prompts_per_step: int = 2
    max_completion_length: int = 6
    # at 10% 5e-5 and above collapsed the held-out reward within 30 steps; at 5% 1e-4 did too (0.359 -> 0.293)
    learning_rate: float = 3e-5
    probe_steps: int = 4
    eval_prompts: int = 256  # distinct addition pairs held out of training
    seed: int = 0
    output_dir: str = "outputs/demo"


def addition_prompts(n: int, max_operand: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{FEW_SHOT}{a} + {b} =", "answer": a + b})
    return rows


def demo_rows(config: DemoConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): ``eval_prompts`` distinct pairs are held out, training draws from the others
    (with 64 spare rows for the probe), so the held-out reward measures generalisation, not memorised sums."""
    pairs = [(a, b) for a in range(config.max_operand + 1) for b in range(config.max_operand + 1)]
    if not 0 < config.eval_prompts < len(pairs):
        raise ValueError(f"eval_prompts must be in (0, {len(pairs)}) for max_operand {config.max_operand} "
                         f"({len(pairs)} distinct pairs), got {config.eval_prompts}")
    held_out = random.Random(config.seed + 1).sample(pairs, config.eval_prompts)
    seen = set(held_out)
    train_pairs = [p for p in pairs if p not in seen]
    rng = random.Random(config.seed)
    train = [rng.choice(train_pairs) for _ in range(config.steps * config.prompts_per_step + 64)]

    def rows(selection):
        return [{"prompt": f"{FEW_SHOT}{a} + {b} =", "answer": a + b} for a, b in selection]

    return rows(train), rows(held_out)


def difference_standard_error(before: float, after: float, n: int) -> float:
    """Standard error of ``after - before`` for two independent sampled rewards on ``n`` prompts each."""
    return math.sqrt((before * (1 - before) + after * (1 - after)) / n)


def first_integer_matches(completion: str, answer: int) -> bool:
    match = _FIRST_INTEGER.search(completion)
    return bool(match) and int(match.group()) == int(answer)


def addition_reward(completions: list[str], answer: list[int], **kwargs) -> list[float]:
    """GRPO reward function: 1.0 when the first integer of the completion is the right sum."""
    return [float(first_integer_matches(c, a)) for c, a in zip(completions, answer)]


@torch.no_grad()
def sampled_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, seed: int, batch_size: int = 64) -> float:
    """Share of prompts answered right when sampling at temperature 1 (the quantity GRPO optimises)."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        enc = tokenizer([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(first_integer_matches(t, r["answer"]) for t, r in zip(texts, batch))
    return correct / len(rows)


def build_demo_trainer(config: DemoConfig, model, tokenizer, train_rows: list[dict], *, reward_funcs=None,
                       peft_config=None, callbacks=None, **grpo_args):
    """The demo's GRPOTrainer (dense until ``sparsify``): benchmarks build the same trainer to compare against it.

    ``reward_funcs`` (default: the addition reward), ``peft_config`` and ``callbacks`` go to ``GRPOTrainer``;
    ``grpo_args`` override ``GRPOConfig`` fields (e.g. ``top_entropy_quantile``, ``logging_steps``)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = dict(
        output_dir=config.output_dir, max_steps=config.steps,
        per_device_train_batch_size=config.num_generations * config.prompts_per_step,
        num_generations=config.num_generations, max_completion_length=config.max_completion_length,
        learning_rate=config.learning_rate, lr_scheduler_type="constant", weight_decay=0.0, temperature=1.0,
        use_cpu=True, bf16=False, report_to="none", logging_steps=5, save_strategy="no", seed=config.seed,
        disable_tqdm=False,
        # GRPOConfig's default, under transformers' new name (the old one, gradient_checkpointing, is deprecated)
        activation_checkpointing=True,
    )
    args.update(grpo_args)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs or addition_reward, args=GRPOConfig(**args),
                       train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer,
                       peft_config=peft_config, callbacks=callbacks)


def quiet_third_party_notices() -> None:
    """Hide two notices the demo's libraries print that are not the user's business:

    - bitsandbytes (imported by PEFT, which TRL imports) logs on CPUs with AVX512-BF16 that it found no ``kernels``
      package for its 4-bit CPU matmul; sparse_rl uses bitsandbytes' quantisation maps only, never 4-bit layers;
    - TRL 1.16 calls ``model.is_gradient_checkpointing`` and ``gradient_checkpointing_enable`` (its selective
      checkpointing wraps the latter), which transformers 5.24 deprecated in favour of ``activation_checkpointing*``;
      the demo's own config already uses the new name.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))
    for message in (r"`(is_)?gradient_checkpointing\w*` is deprecated", r"`\w+` only defines `gradient_checkpointing"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def run_demo(density: float | None = None, steps: int | None = None, output_dir: str = "outputs/demo",
             config: DemoConfig | None = None) -> dict:
    """Run the demo; ``config`` (if given) replaces the defaults, and ``density`` (None: the default)/``steps``/
    ``output_dir``."""
    quiet_third_party_notices()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import sparsify
    from .discovery import ProbeOptions
    from .models import smollm2_checkpoint
    from .optim import MaskedAdamW, unwrap_optimizer

    if config is None:
        config = DemoConfig(output_dir=output_dir)
    if density is not None:
        config.density = density
    if steps is not None:
        config.steps = steps
    started = time.time()
    print("== sparse_rl demo: GRPO on SmolLM2-135M-Instruct, training a "
          f"{config.density:.0%} subnetwork on CPU ==", flush=True)
    checkpoint = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    train_rows, eval_rows = demo_rows(config)
    before = sampled_accuracy(model, tokenizer, eval_rows, config.max_completion_length, seed=config.seed)
    print(f"reward before training (sampled, {len(eval_rows)} held-out prompts): {before:.3f}", flush=True)

    trainer = build_demo_trainer(config, model, tokenizer, train_rows)
    probe_start = time.time()
    # compact gradients are on by default in one process (SparseConfig.compact_grads=None)
    sparse = sparsify(trainer, SparseConfig(density=config.density, discovery="gradient",
                                            probe=ProbeOptions(steps=config.probe_steps)))
    print(f"mask from a {config.probe_steps}-batch gradient probe of the GRPO loss: "
          f"{time.time() - probe_start:.0f}s", flush=True)
    trainer.train()

    after = sampled_accuracy(model, tokenizer, eval_rows, config.max_completion_length, seed=config.seed)
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, MaskedAdamW)
    sparse_state = optimizer.state_bytes()
    trained_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense_state = 2 * 4 * sum(p.numel() for p in model.parameters())  # torch AdamW: exp_avg + exp_avg_sq, fp32
    changed_unselected = 0
    changed_selected = 0
    for name, param in model.named_parameters():
        changed = param.detach() != initial[name]
        selection = sparse.mask[name] if name in sparse.mask else torch.zeros_like(changed)
        changed_unselected += int((changed & ~selection).sum())
        changed_selected += int((changed & selection).sum())
    train_rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]

    final = Path(config.output_dir) / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    sparse.mask.save(final / "sparse_mask.safetensors")

    total = sum(p.numel() for p in model.parameters())
    print("\n== results ==")
    se = difference_standard_error(before, after, len(eval_rows))
    print(f"reward before -> after (sampled, held-out): {before:.3f} -> {after:.3f} "
          f"({after - before:+.3f}, {(after - before) / se:+.1f} standard errors of the difference, SE {se:.3f})")
    if train_rewards:
        print(f"training reward, first -> last logged window: {train_rewards[0]:.3f} -> {train_rewards[-1]:.3f}")
    print(f"parameters trained: {sparse.mask.num_selected:,} of {total:,} ({sparse.mask.num_selected / total:.2%}); "
          f"tensors with a gradient: {trained_numel:,} entries")
    print(f"optimizer state: {sparse_state / 2**20:.1f} MiB vs dense AdamW {dense_state / 2**20:.1f} MiB "
          f"({sparse_state / dense_state:.3f}x)")
    print(f"selected entries changed: {changed_selected:,}; unselected entries changed: {changed_unselected} "
          "(must be 0)")
    print(f"trained model and mask saved to {final}; total time {time.time() - started:.0f}s")
    if changed_unselected:
        raise SystemExit("unselected entries changed: the subnetwork restriction is broken")
    return dict(before=before, after=after, se=se, train_rewards=train_rewards, seconds=time.time() - started,
                changed_unselected=changed_unselected,
                state_ratio=sparse_state / dense_state)
