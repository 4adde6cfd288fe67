"""Bootstrap intervals over seeds and prompts for held-out rewards.

A row's result is a matrix ``seeds x prompts`` of per-prompt success rates (correct samples / samples). Both are
samples from larger populations: seeds from the training randomness, prompts from the task. One bootstrap replicate
draws the prompts with replacement once, **shared by every row** (all rows are evaluated on the same held-out
prompts, so comparisons are paired over prompts and prompt difficulty cancels), and draws each row's seeds with
replacement; two rows with the same seeds have them drawn jointly (seed ``s`` of both rows saw the same data
order). A statistic of the row means (a mean, a difference, a share of a gain) is computed on every replicate; the
interval is the replicates' 2.5th-97.5th percentiles.

With 3 seeds the seed resampling has only 10 distinct outcomes and percentile intervals are somewhat too narrow (a
known small-sample bias of the bootstrap); ``seed_sd`` is reported beside them so a reader can judge the spread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


def success_matrix(records: list[dict], step: int | None = None) -> np.ndarray:
    """``seeds x prompts`` success rates of a row's runs, at ``step`` (default: each run's last evaluation)."""
    rows = []
    for record in records:
        evals = record["evals"]
        chosen = evals[-1] if step is None else next((e for e in evals if e["step"] == step), None)
        if chosen is None:
            raise ValueError(f"run {record.get('id')} has no evaluation at step {step}")
        rows.append(np.asarray(chosen["correct"], dtype=float) / record["config"]["eval_samples"])
    if len({len(r) for r in rows}) > 1:
        raise ValueError("the runs of a row were evaluated on different numbers of prompts")
    return np.stack(rows)


def same_seeds(runs: list[dict], reference: list[dict]) -> bool:
    """Whether two rows ran the same seeds (then seed ``s`` of both saw the same data order and is drawn jointly)."""
    return sorted(r["config"]["seed"] for r in runs) == sorted(r["config"]["seed"] for r in reference)


def bootstrap(rows: Mapping[str, np.ndarray], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
              replicates: int = 2000, seed: int = 0, seed_ids: Mapping[str, tuple] | None = None) -> Interval:
    """Interval of ``statistic`` (a function of the rows' mean rewards, vectorised over replicates) by resampling
    prompts (shared) and seeds (per row; jointly for rows whose ``seed_ids`` are equal)."""
    if not rows:
        raise ValueError("no rows to bootstrap")
    prompts = {m.shape[1] for m in rows.values()}
    if len(prompts) != 1:
        raise ValueError(f"every row must have the same held-out prompts, got prompt counts {sorted(prompts)}")
    n_prompts = prompts.pop()
    rng = np.random.default_rng(seed)
    prompt_idx = rng.integers(0, n_prompts, size=(replicates, n_prompts))
    seed_draws: dict[tuple, np.ndarray] = {}
    means = {}
    for name, matrix in rows.items():
        key = (tuple(seed_ids[name]) if seed_ids and name in seed_ids else ("row", name), matrix.shape[0])
        if key not in seed_draws:
            seed_draws[key] = rng.integers(0, matrix.shape[0], size=(replicates, matrix.shape[0]))
        # mean over the drawn prompts for every seed and replicate: (seeds, replicates)
        per_seed = matrix[:, prompt_idx].mean(axis=2)
        drawn = np.take_along_axis(per_seed.T, seed_draws[key], axis=1)  # (replicates, seeds)
        means[name] = drawn.mean(axis=1)
    values = np.asarray(statistic(means), dtype=float)
    point = float(np.asarray(statistic({k: np.asarray([m.mean()]) for k, m in rows.items()}))[0])
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Interval(point, float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return Interval(point, float(low), float(high))


def mean_interval(matrix: np.ndarray, **kw) -> Interval:
    return bootstrap({"row": matrix}, lambda m: m["row"], **kw)


def difference_interval(row: np.ndarray, reference: np.ndarray, same_seeds: bool = True, **kw) -> Interval:
    """``mean(row) - mean(reference)``, paired over prompts (and over seeds when ``same_seeds``)."""
    ids = {"row": (0,), "reference": (0,)} if same_seeds and row.shape[0] == reference.shape[0] else None
    return bootstrap({"row": row, "reference": reference}, lambda m: m["row"] - m["reference"], seed_ids=ids, **kw)


def gain_share_interval(row: np.ndarray, full: np.ndarray, base: np.ndarray, same_seeds: bool = True,
                        **kw) -> Interval:
    """Share of full finetuning's held-out gain the row recovers: ``(row - base) / (full - base)``, paired over
    prompts (and seeds when ``same_seeds``). ``base`` is the untrained model's evaluation (one "seed"); replicates
    where full finetuning gained nothing are dropped."""
    def share(m):
        gain = m["full"] - m["base"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gain > 0, (m["row"] - m["base"]) / gain, np.nan)

    ids = {"row": (0,), "full": (0,)} if same_seeds and row.shape[0] == full.shape[0] else None
    return bootstrap({"row": row, "full": full, "base": base}, share, seed_ids=ids, **kw)


def seed_sd(matrix: np.ndarray) -> float:
    """Standard deviation of the per-seed mean rewards (0 for one seed)."""
    means = matrix.mean(axis=1)
    return float(means.std(ddof=1)) if len(means) > 1 else 0.0


def sampling_sd(matrix: np.ndarray, samples: int) -> float:
    """Standard deviation of one run's mean reward that comes from sampling ``samples`` completions per prompt alone
    (the prompts held fixed), root-mean-square over the row's seeds: the evaluation noise, to set beside
    :func:`seed_sd` (which contains it). From the unbiased within-prompt variance p(1-p) k/(k-1) of each prompt."""
    if samples < 2:
        return float("nan")
    within = matrix * (1 - matrix) * samples / (samples - 1)  # per seed and prompt
    variance = within.sum(axis=1) / samples / matrix.shape[1] ** 2
    return float(np.sqrt(variance.mean()))
