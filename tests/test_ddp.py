"""sparse_rl under DDP: 2 gloo processes on CPU (forked, see tests/ddp_worker.py) against a 1-process run.

Tolerance: a DDP gradient is the mean of two per-process gradients computed on half batches and summed by gloo's
all-reduce; the 1-process gradient sums the same examples inside one matmul. The fp32 sums differ in rounding order
only (measured: 7e-9 on gradients, 1.3e-8 on weights after 3 AdamW steps of lr 1e-3). ``ATOL = 1e-5`` on weights
(1e-6 on gradients) is ~100x the measured drift and 100x smaller than one optimizer step (~lr). Checked by mutation:
a rank-local entropy threshold (no all-gather) moves the weights by 3.6e-3 and the gradients by 7e-3. Adam's update
depends mostly on the gradient's sign, so the gradient comparison is the one that catches scale errors (a sum
instead of a mean over processes).

Gradient discovery: the probe runs in ``sparsify``, before ``train()`` wraps the model in DDP, so its backward
leaves each rank its own shard's gradient (recorded: they differ between ranks). The probe averages each step's
gradient over the ranks before scoring it, so the mask is the global batch's. Against a 1-process probe of the
global batch the scores differ by rounding only; a mask entry may then differ only where the 1-process score lies
within twice that rounding of the top-k threshold (an order statistic moves by at most the largest score change).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import (
    BUDGETS,
    PROBE_SCORES,
    ProbeOptions,
    accumulate_gradient_scores,
    gradient_mask,
    mask_from_scores,
)
from sparse_rl.distributed import agree_on_mask, check_masks_agree, mask_digests
from sparse_rl.mask import SubnetworkMask
from sparse_rl.restrict.tokens import entropy_quantile_threshold
from tests import ddp_worker
from tests.test_trl_refusals import _assert_same, _fingerprint
from tests.tiny import save_tiny_checkpoint
from tests.trl_cases import build_trainer

WORLD_SIZE = 2
ATOL = 1e-5
WORKER = Path(ddp_worker.__file__)


def _load(folder: Path, scenario: str) -> list[dict]:
    return [torch.load(folder / f"{scenario}-rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ddp") / "tiny-llama")


@pytest.fixture(scope="module")
def two_processes(checkpoint):
    out = checkpoint.parent / "two-processes"
    out.mkdir()
    ddp_worker.run_forked(checkpoint, out, WORLD_SIZE)
    return {name: _load(out, name) for name in ddp_worker.SCENARIOS}


@pytest.fixture(scope="module")
def one_process(checkpoint):
    return ddp_worker.run_dpo(checkpoint, checkpoint.parent / "one-process", world_size=1)


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_two_processes_train_like_one_on_the_same_global_batch(two_processes, one_process):
    ranks = two_processes["dpo"]
    assert all(rank["world_size"] == WORLD_SIZE for rank in ranks)
    assert ranks[0]["mask"] == one_process["mask"]
    # the run moved the selected weights by far more than the tolerance, so the comparison means something
    assert _max_difference(one_process["final"], one_process["initial"]) > 100 * ATOL
    for rank in ranks:
        assert rank["gradients"].keys() == one_process["gradients"].keys()
        assert _max_difference(rank["gradients"], one_process["gradients"]) <= ATOL / 10
        assert _max_difference(rank["final"], one_process["final"]) <= ATOL


def test_entropy_threshold_is_taken_over_the_global_batch(two_processes, one_process):
    ranks = two_processes["dpo"]
    assert len(one_process["entropy_thresholds"]) == ddp_worker.DPO_STEPS
    assert ranks[0]["entropy_thresholds"] == ranks[1]["entropy_thresholds"]
    assert ranks[0]["entropy_thresholds"] == pytest.approx(one_process["entropy_thresholds"], abs=1e-6)

    # the same selection on tensors: each rank's threshold is the quantile over the tokens of both ranks
    shards = [ddp_worker.entropy_shard(rank) for rank in range(WORLD_SIZE)]
    everything = torch.cat([entropy[valid] for entropy, valid in shards])
    expected = float(entropy_quantile_threshold(everything, ddp_worker.ENTROPY_QUANTILE))
    local = [float(entropy_quantile_threshold(e[v], ddp_worker.ENTROPY_QUANTILE)) for e, v in shards]
    assert local[0] != expected != local[1]  # a rank-local threshold would be a different one
    for rank, result in enumerate(two_processes["collectives"]):
        entropy, valid = shards[rank]
        assert result["threshold"] == expected
        assert torch.equal(result["keep"], valid & (entropy >= expected))
        assert result["num_valid"] == everything.numel()
        assert result["num_kept"] == int((everything >= expected).sum())


@pytest.mark.parametrize("scenario", ["dpo", "grpo_gradient"])
def test_every_rank_holds_the_same_mask_and_weights(scenario, two_processes):
    first, second = two_processes[scenario]
    assert first["mask"] == second["mask"]
    assert all(torch.equal(first["final"][name], second["final"][name]) for name in first["final"])


@pytest.mark.parametrize("scenario", ["dpo", "grpo_gradient"])
def test_unselected_entries_stay_bit_identical_on_every_rank(scenario, two_processes):
    for rank in two_processes[scenario]:
        mask, changed_selected = rank["mask"], 0
        for name, before in rank["initial"].items():
            changed = rank["final"][name] != before
            selection = mask[name] if name in mask else torch.zeros_like(changed)
            assert not bool((changed & ~selection).any()), f"{name}: an unselected entry changed"
            changed_selected += int((changed & selection).sum())
        assert changed_selected > 0


def test_all_reduced_gradient_is_masked(two_processes):
    """The hooks zero unselected entries before DDP's reducer reads ``.grad``: what DDP all-reduced, and what the
    optimizer sees, is the masked gradient, the same on both ranks."""
    first, second = two_processes["dpo"]
    mask = first["mask"]
    for name, gradient in first["gradients"].items():
        assert torch.equal(gradient, second["gradients"][name])
        assert not bool(gradient[~mask[name]].any()), f"{name}: non-zero gradient outside the mask"
        assert bool(gradient[mask[name]].any())


def _gradient_scores(steps: list[dict], names) -> dict[str, torch.Tensor]:
    """The probe's ``"gradient"`` score, summed in the probe's order (bit-identical to it)."""
    return {name: sum(step[name].abs() for step in steps) for name in names}


def test_grpo_probe_selects_from_the_gradients_of_both_ranks(two_processes):
    first, second = two_processes["grpo_gradient"]
    # the probe ran before DDP wrapped the model (train() does), so DDP did not average its gradients: each rank's
    # backward left the gradient of its own prompts
    assert first["probed_ddp"] == [False] * ddp_worker.GRPO_PROBE.probe.steps and first["trained_ddp"]
    local = [rank["local_gradients"] for rank in (first, second)]
    assert any(not torch.equal(local[0][0][name], local[1][0][name]) for name in local[0][0])

    # gloo sums two fp32 values exactly as torch does, so averaging the recorded gradients reproduces the probe's
    # scores bit for bit, and its mask exactly
    names = list(first["mask"])
    averaged = [{name: (a[name] + b[name]) / 2 for name in names} for a, b in zip(*local)]
    config = ddp_worker.GRPO_PROBE
    expected = mask_from_scores(_gradient_scores(averaged, names), config.density, config.probe.budget)
    assert first["mask"] == expected and second["mask"] == expected
    rank_zero_alone = mask_from_scores(_gradient_scores(local[0], names), config.density, config.probe.budget)
    assert rank_zero_alone != expected


def _beyond_rounding(mask, reference: dict, delta: dict, budget: str) -> int:
    """Entries where ``mask`` and the top-``PROBE_DENSITY`` of ``reference`` disagree although their reference
    score is farther than ``2 * delta`` from the threshold (``delta``: the largest score change, per tensor for the
    per-tensor budget, pooled for the global one)."""
    expected = mask_from_scores(reference, ddp_worker.PROBE_DENSITY, budget)
    groups = [[name] for name in reference] if budget == "per_tensor" else [list(reference)]
    count = 0
    for group in groups:
        pooled = torch.cat([reference[name].reshape(-1) for name in group])
        k = min(pooled.numel(), max(1, math.ceil(ddp_worker.PROBE_DENSITY * pooled.numel())))
        threshold = torch.topk(pooled, k).values.min()
        slack = 2 * max(delta[name] for name in group)
        for name in group:
            far = (reference[name] - threshold).abs() > slack
            count += int(((mask[name] != expected[name]) & far).sum())
    return count


def test_probe_mask_is_the_global_batch_mask(two_processes, checkpoint):
    """Every score kind and budget, against a 1-process probe of both ranks' rows and against rank 0's rows alone."""
    first, second = two_processes["probe"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    everything = ddp_worker.probe_loss(model, slice(None))
    rank_zero_rows = ddp_worker.probe_loss(model, ddp_worker.probe_shard(0))
    for kind in PROBE_SCORES:
        scores = first["scores"][kind]
        assert all(torch.equal(scores[name], second["scores"][kind][name]) for name in scores)
        probe = ProbeOptions(steps=ddp_worker.PROBE_STEPS, score=kind)
        reference = accumulate_gradient_scores(model, everything, probe)
        assert scores.keys() == reference.keys()
        delta = {name: float((scores[name] - reference[name]).abs().max()) for name in scores}
        largest = max(float(score.abs().max()) for score in reference.values())
        # measured: 1.2e-7, 1.3e-7, 5e-5, 6.4e-8 of the largest score (Adam's m/sqrt(v) magnifies the rounding of
        # gradients near eps); rank 0's rows alone are 0.2-1.0x the largest score away
        assert max(delta.values()) <= 1e-3 * largest, f"{kind}: the scores are not the global batch's"
        for budget in BUDGETS:
            mask = first["masks"][kind, budget]
            assert mask == second["masks"][kind, budget]
            assert mask == mask_from_scores(scores, ddp_worker.PROBE_DENSITY, budget)
            assert _beyond_rounding(mask, reference, delta, budget) == 0, (kind, budget)
            alone = gradient_mask(model, rank_zero_rows, ddp_worker.PROBE_DENSITY,
                                  ProbeOptions(steps=ddp_worker.PROBE_STEPS, score=kind, budget=budget))
            assert _beyond_rounding(alone, reference, delta, budget) > 0, (kind, budget)


def test_probe_averages_with_zeros_where_a_rank_has_no_gradient(two_processes):
    """A rank whose graph misses a parameter adds zeros to the average (its share of the global batch does not
    touch it); a step where no rank touches it is skipped, as a 1-process probe (and AdamW) skips it."""
    model = ddp_worker.partial_model()
    reference = accumulate_gradient_scores(
        model, lambda step: sum(ddp_worker.partial_loss(model, rank, step) for rank in range(WORLD_SIZE)) / WORLD_SIZE,
        ProbeOptions(steps=3, score="adam"))
    for rank in two_processes["collectives"]:
        assert rank["partial_scores"].keys() == reference.keys()
        for name, score in reference.items():
            torch.testing.assert_close(rank["partial_scores"][name], score)


def test_different_seeded_masks_are_refused_on_every_rank(two_processes):
    for rank in two_processes["dpo"]:
        assert "rank 1 holds a different mask than rank 0" in rank["refusal"]
        assert "use the same seed and mask file everywhere" in rank["refusal"]
        assert rank["sparsified_after_refusal"] is False
    for rank in two_processes["collectives"]:
        assert "rank 1 holds a different mask than rank 0 (1 tensor(s) differ, first 'a')" in rank["check_one_bit"]
        assert "rank 1 probes different parameters than rank 0 (it has 'c.weight', which rank 0 does not)" in rank[
            "probe_structure"]


def test_torchrun_launch(checkpoint, tmp_path):
    """The launcher of a CPU run (``accelerate launch --cpu`` starts one process only, whatever --num_processes):
    fresh processes from ``torchrun``, so this test pays the imports; it runs the GRPO probe scenario only."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               str(WORKER), str(checkpoint), str(tmp_path), "grpo_gradient"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    first, second = _load(tmp_path, "grpo_gradient")
    assert first["world_size"] == WORLD_SIZE
    assert first["mask"] == second["mask"]
    assert any(not torch.equal(first["local_gradients"][0][name], second["local_gradients"][0][name])
               for name in first["local_gradients"][0])


# ---------------------------------------------------------------------------------------------- one process
def test_single_process_agreement_is_a_no_op():
    mask = SubnetworkMask({"w": torch.tensor([True, False])})
    assert agree_on_mask(mask, discovered=True) is mask
    assert agree_on_mask(mask, discovered=False) is mask
    check_masks_agree(mask)


def test_digests_see_one_bit_and_the_shape():
    selection = torch.zeros(64, dtype=torch.bool)
    flipped = selection.clone()
    flipped[37] = True
    base = mask_digests(SubnetworkMask({"w": selection}))
    assert mask_digests(SubnetworkMask({"w": selection.clone()})) == base
    assert mask_digests(SubnetworkMask({"w": flipped})) != base
    assert mask_digests(SubnetworkMask({"w": selection.reshape(8, 8)})) != base


@pytest.mark.parametrize("stage", [1, 2, 3, None])
def test_deepspeed_is_refused_with_the_alternatives(stage, tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    trainer.is_deepspeed_enabled = True  # what Trainer sets from a DeepSpeed config; deepspeed is not installed
    if stage is not None:  # an instance attribute: the real AcceleratorState is a process-wide singleton
        trainer.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    before = _fingerprint(trainer)
    expected = f"DeepSpeed ZeRO stage {stage} is not supported" if stage else "DeepSpeed is not supported"
    with pytest.raises(UnsupportedTrainerSetup, match=expected) as refusal:
        sparsify(trainer, SparseConfig(discovery="random"))
    assert "accelerate launch --multi_gpu --num_processes N" in str(refusal.value)
    assert "FSDP2" in str(refusal.value)
    _assert_same(before, _fingerprint(trainer))
