"""Bootstrap statistics of the choose-by experiment on synthetic data whose answer is known."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from choosing.stats import (  # noqa: E402
    bootstrap,
    difference_interval,
    gain_share_interval,
    mean_interval,
    same_seeds,
    sampling_sd,
    seed_sd,
    success_matrix,
)


def _synthetic(rng, seeds, prompts, mean, seed_spread=0.05, samples=4, difficulty=None):
    """Per-prompt success rates: prompt difficulty + a per-seed offset, then ``samples`` Bernoulli draws."""
    if difficulty is None:
        difficulty = rng.normal(0, 1.0, size=prompts)
    logits = np.log(mean / (1 - mean)) + difficulty[None, :] + rng.normal(0, seed_spread * 4, size=(seeds, 1))
    p = 1 / (1 + np.exp(-logits))
    return rng.binomial(samples, p) / samples


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # population: prompt difficulties and seed offsets drawn fresh for every data set; the true mean is their
    # expectation, estimated once with a very large sample
    rng = np.random.default_rng(0)
    truth = _synthetic(rng, 4000, 2000, 0.4).mean()
    hits, widths = 0, []
    for trial in range(150):
        data = _synthetic(rng, 10, 200, 0.4)
        interval = mean_interval(data, replicates=1000, seed=trial)
        hits += interval.low <= truth <= interval.high
        widths.append(interval.width)
    assert 0.86 <= hits / 150 <= 0.995, hits / 150
    assert 0.02 < np.mean(widths) < 0.2


def test_interval_narrows_with_more_prompts_and_seeds():
    rng = np.random.default_rng(1)
    small = mean_interval(_synthetic(rng, 3, 64, 0.4), replicates=1000).width
    large = mean_interval(_synthetic(rng, 12, 1024, 0.4), replicates=1000).width
    assert large < small / 2


def test_identical_rows_differ_by_zero_and_recover_all_of_the_gain():
    rng = np.random.default_rng(2)
    full, base = _synthetic(rng, 3, 256, 0.6), _synthetic(rng, 1, 256, 0.3)
    same = difference_interval(full, full.copy())
    assert same.estimate == 0 and same.low == 0 and same.high == 0  # paired seeds and prompts: exactly zero
    share = gain_share_interval(full, full, base)
    assert share.estimate == pytest.approx(1.0) and share.low == pytest.approx(1.0) and share.high == pytest.approx(1.0)


def test_known_difference_is_found_and_paired_prompts_make_it_sharper():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 2.0, size=256)  # prompts differ a lot: unpaired comparisons would be noisy
    reference = _synthetic(rng, 3, 256, 0.4, difficulty=difficulty, seed_spread=0.0, samples=1000)
    better = np.clip(reference + 0.1, 0, 1)
    paired = difference_interval(better, reference)
    assert paired.estimate == pytest.approx(float((better - reference).mean()))
    assert paired.low > 0.05 and paired.high < 0.11
    # the same data with prompts resampled independently for the two rows (no pairing) is far wider
    unpaired = bootstrap({"a": better}, lambda m: m["a"], seed=1).width + bootstrap(
        {"b": reference}, lambda m: m["b"], seed=2).width
    assert paired.width < unpaired / 4


def test_gain_share_of_a_row_halfway_between_base_and_full():
    rng = np.random.default_rng(4)
    base = _synthetic(rng, 1, 256, 0.3, seed_spread=0.0, samples=1000)
    full = np.clip(base + 0.3, 0, 1)
    half = base + (full - base) / 2
    share = gain_share_interval(np.repeat(half, 3, axis=0), np.repeat(full, 3, axis=0), base)
    assert share.estimate == pytest.approx(0.5)
    assert share.low <= 0.5 <= share.high and share.width < 0.05


def test_no_difference_is_rarely_called_a_difference():
    # two rows from the same population: the 95% interval of their difference excludes 0 in about 5% of data sets
    # (a little more with few seeds, the bootstrap's small-sample optimism)
    rng = np.random.default_rng(5)
    false_positives = 0
    for trial in range(100):
        difficulty = rng.normal(0, 1.0, size=128)
        a = _synthetic(rng, 8, 128, 0.4, difficulty=difficulty)
        b = _synthetic(rng, 8, 128, 0.4, difficulty=difficulty)
        false_positives += difference_interval(a, b, same_seeds=False, replicates=500, seed=trial).excludes(0.0)
    assert false_positives <= 14, false_positives


def test_success_matrix_reads_runs_and_checks_prompt_counts():
    record = {"id": "r", "config": {"eval_samples": 4},
              "evals": [{"step": 20, "correct": [0, 4, 2]}, {"step": 60, "correct": [4, 4, 1]}]}
    assert success_matrix([record]).tolist() == [[1.0, 1.0, 0.25]]
    assert success_matrix([record], step=20).tolist() == [[0.0, 1.0, 0.5]]
    with pytest.raises(ValueError, match="no evaluation at step 40"):
        success_matrix([record], step=40)
    other = {**record, "evals": [{"step": 60, "correct": [1, 2]}]}
    with pytest.raises(ValueError, match="different numbers of prompts"):
        success_matrix([record, other])
    with pytest.raises(ValueError, match="same held-out prompts"):
        bootstrap({"a": np.zeros((1, 3)), "b": np.zeros((1, 2))}, lambda m: m["a"])
    assert seed_sd(np.array([[0.0, 0.0], [1.0, 1.0]])) == pytest.approx(np.sqrt(0.5))


def test_rows_are_paired_over_seeds_only_when_they_ran_the_same_seeds():
    def runs(*seeds):
        return [{"config": {"seed": s}} for s in seeds]
    assert same_seeds(runs(2, 0, 1), runs(0, 1, 2))  # order of loading does not matter
    assert not same_seeds(runs(0, 1), runs(0, 1, 2))
    assert not same_seeds(runs(3, 4), runs(0, 1))  # same count, other seeds: unpaired


def test_sampling_sd_matches_the_spread_of_repeated_evaluations_of_one_model():
    """Evaluate one fixed "model" (per-prompt success probabilities) many times with k samples per prompt: the SD of
    its mean reward across evaluations is what ``sampling_sd`` estimates from a single evaluation."""
    rng = np.random.default_rng(3)
    probabilities, samples = rng.beta(0.7, 0.7, size=256), 4
    evaluations = rng.binomial(samples, probabilities, size=(4000, 256)) / samples
    true_sd = evaluations.mean(axis=1).std()
    estimates = [sampling_sd(evaluations[i:i + 3], samples) for i in range(0, 300, 3)]
    assert abs(np.mean(estimates) / true_sd - 1) < 0.05
    # a model that always or never succeeds has no sampling noise; one sample per prompt cannot estimate it
    assert sampling_sd(np.array([[0.0, 1.0, 1.0]]), samples) == 0.0
    assert np.isnan(sampling_sd(evaluations[:1], 1))
