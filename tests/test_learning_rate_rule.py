"""SparseConfig.suggested_learning_rate: the factors over full finetuning's lr are the committed "Choose by" sweeps'
best learning rates (so new sweep results that move a best lr fail here until the rule follows them), and bad
input is refused."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from sparse_rl import SparseConfig, SubnetworkMask
from sparse_rl.config import learning_rate_factor

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import choose_by  # noqa: E402
from choosing.plan import build_plan  # noqa: E402

GRID_STEP = math.sqrt(10)  # the sweeps' grid: 1e-6, 3e-6, 1e-5, 3e-5, ...


def _best_lr_of_sweeps(model_dir, weights_dir) -> dict[str, float]:
    """Row -> best lr of each finished sweep on the main task, as the experiment's own plan decides it (complete,
    widened while the best sat at an edge) from the committed runs. The plan reads the model only for LoRA's rank,
    which no sparse or full row depends on, so the tiny checkpoint serves."""
    args = choose_by.parse_args([])
    plan = build_plan(choose_by.protocol_of(args), args.results / "runs", weights_dir, model_dir,
                      tuple(args.tasks.split(",")))
    return {row: lr for (task, row), lr in plan.best_lr.items()}


SWEPT_ROW = re.compile(r"sparse-(gradient|random)-([0-9.]+)")  # the discovered masks the rule covers


def test_factors_are_the_sweeps_best_lr_over_full_finetunings(tiny_checkpoint, tmp_path):
    """Every finished sweep of a probe or random mask, whatever its density, has its best lr within half a grid
    step of the rule's suggestion."""
    best = _best_lr_of_sweeps(tiny_checkpoint, tmp_path / "weights")
    covered = {row: SWEPT_ROW.fullmatch(row) for row in best if SWEPT_ROW.fullmatch(row)}
    assert "full" in best
    assert {"sparse-gradient-0.1", "sparse-gradient-0.05", "sparse-gradient-0.01", "sparse-random-0.1",
            "sparse-random-0.01", "sparse-random-0.3"} <= set(covered)
    for row, match in covered.items():
        config = SparseConfig(discovery=match[1], density=float(match[2]))
        suggested = config.suggested_learning_rate(best["full"])
        # the suggestion lands on the sweep's best grid point: within half a grid step of it
        assert abs(math.log(suggested / best[row])) < math.log(GRID_STEP) / 2, (row, suggested, best[row])


def test_factors_are_the_measured_ones_and_interpolate_in_log_log_between_them():
    from sparse_rl.config import MEASURED_LR_FACTORS

    for discovery, points in MEASURED_LR_FACTORS.items():
        for density, factor in points:
            assert learning_rate_factor(discovery, density) == pytest.approx(factor)
        assert points[-1] == (1.0, 1.0)  # every mask at density 1 is full finetuning
        assert learning_rate_factor(discovery, 0.001) == pytest.approx(points[0][1])  # held below the lowest
        grid = [10 ** (e / 20) for e in range(-60, 1)]  # 0.1% .. 100%
        factors = [learning_rate_factor(discovery, d) for d in grid]
        assert all(a >= b for a, b in zip(factors, factors[1:]))  # a denser mask never wants a larger lr
    # a power law between neighbours: halfway in log density is the geometric mean of the two factors
    assert learning_rate_factor("gradient", (0.05 * 0.1) ** 0.5) == pytest.approx((10.0 * 3.0) ** 0.5)
    assert learning_rate_factor("random", (0.1 * 0.3) ** 0.5) == pytest.approx((30.0 * 3.0) ** 0.5)
    assert SparseConfig(density=0.05).suggested_learning_rate(1e-6) == pytest.approx(1e-5)


@pytest.mark.parametrize("lr", [0, -1e-6, float("nan"), float("inf"), "1e-6", None])
def test_bad_full_finetuning_lr_is_refused(lr):
    with pytest.raises(ValueError, match="full_finetuning_lr must be a positive finite number"):
        SparseConfig().suggested_learning_rate(lr)


def test_a_given_mask_has_no_rule():
    mask = SubnetworkMask({"w": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no measured rule for a given mask"):
        SparseConfig(mask=mask).suggested_learning_rate(1e-6)
