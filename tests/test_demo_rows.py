"""The demo's data split: the held-out reward must measure addition pairs that training never saw."""

from __future__ import annotations

import pytest

from sparse_rl.demo import FEW_SHOT, DemoConfig, demo_rows, difference_standard_error


def _pair(row):
    a, b = row["prompt"][len(FEW_SHOT):].rstrip(" =").split(" + ")
    return int(a), int(b)


def test_held_out_pairs_are_distinct_and_never_trained_on():
    config = DemoConfig(steps=30, eval_prompts=256)
    train, held_out = demo_rows(config)
    held_pairs = [_pair(r) for r in held_out]
    assert len(held_out) == 256 and len(set(held_pairs)) == 256
    assert len(train) == config.steps * config.prompts_per_step + 64
    assert not {_pair(r) for r in train} & set(held_pairs)
    assert all(r["answer"] == sum(_pair(r)) for r in train + held_out)
    assert demo_rows(config) == (train, held_out)  # seeded


def test_eval_prompts_out_of_range_is_refused():
    with pytest.raises(ValueError, match="eval_prompts"):
        demo_rows(DemoConfig(max_operand=3, eval_prompts=16))  # 16 pairs only: nothing left to train on


def test_difference_standard_error():
    assert difference_standard_error(0.5, 0.5, 100) == pytest.approx((0.5 / 100) ** 0.5)
