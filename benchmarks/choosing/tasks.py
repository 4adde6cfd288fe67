"""The verifiable tasks: rows for training, a fixed held-out set, a reward function.

Both tasks are plain-text few-shot prompts whose completion should start with an integer; the reward is 1 when the
first integer of the completion is the answer (``sparse_rl.demo.first_integer_matches``, the demo's check), under a
reward function named for the task, since TRL logs each reward under its function's name.
Every prompt of a task starts with the same few-shot text, which the evaluation computes once per batch
(``evaluate.py``).

- ``addition``: the demo's task (``sparse_rl.demo``): "a + b =" with operands up to 19, 256 held-out pairs.
- ``subtraction``: "a - b =" with 0 <= b <= a <= 29 (465 pairs, 256 held out). Candidates measured on 64 prompts x
  4 samples before it was chosen (base model, temperature 1): letter counting of one-token words 0.07 (0.10 for
  words of 3-6 letters, 0.09 with the letters spelled out), counting 2-5 comma-separated words 0.10, subtraction
  with a <= 39 0.14: every other kind sat at the floor of the useful 0.1-0.8 range, so the second task stays
  arithmetic but needs borrowing, a different procedure from addition's carrying.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

TASKS = ("addition", "subtraction")
SUBTRACTION_FEW_SHOT = "9 - 4 = 5\n17 - 8 = 9\n23 - 11 = 12\n"
SUBTRACTION_MAX = 29


@dataclass
class Task:
    name: str
    train_rows: list[dict]  # {"prompt", "answer"} in training order (the trainer shuffles with its seed)
    held_out: list[dict]
    reward: Callable  # GRPO reward function (completions, answer, **kwargs) -> list[float]


def make_task(name: str, steps: int, prompts_per_step: int, eval_pairs: int) -> Task:
    """The task ``name`` with enough training rows for ``steps`` x ``prompts_per_step`` (+64 for the probe) and
    ``eval_pairs`` held-out rows never used in training. The held-out set depends on ``eval_pairs`` only, so every
    run of a task is evaluated on the same prompts (the bootstrap over prompts pairs the runs)."""
    from sparse_rl.demo import DemoConfig, addition_reward, demo_rows

    if name == "addition":
        # seed 0 fixes the data for every run; runs differ by the trainer's seed (shuffling, sampling)
        train, held_out = demo_rows(DemoConfig(steps=steps, prompts_per_step=prompts_per_step,
                                               eval_prompts=eval_pairs, seed=0))
        return Task(name, train, held_out, addition_reward)
    if name == "subtraction":
        pairs = [(a, b) for a in range(SUBTRACTION_MAX + 1) for b in range(a + 1)]
        if not 0 < eval_pairs < len(pairs):
            raise ValueError(f"eval_pairs must be in (0, {len(pairs)}) for subtraction, got {eval_pairs}")
        held_out = random.Random(1).sample(pairs, eval_pairs)
        seen = set(held_out)
        pool = [p for p in pairs if p not in seen]
        rng = random.Random(0)
        train = [rng.choice(pool) for _ in range(steps * prompts_per_step + 64)]
        return Task(name, subtraction_rows(train), subtraction_rows(held_out), subtraction_reward)
    raise ValueError(f"unknown task {name!r}; tasks: {TASKS}")


def subtraction_reward(completions: list[str], answer: list[int], **kwargs) -> list[float]:
    """GRPO reward function: 1.0 when the first integer of the completion is the right difference (the demo's
    check, under this task's name for TRL's log)."""
    from sparse_rl.demo import addition_reward

    return addition_reward(completions, answer)


def subtraction_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": f"{SUBTRACTION_FEW_SHOT}{a} - {b} =", "answer": a - b} for a, b in pairs]
