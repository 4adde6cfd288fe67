"""sparse_rl under DDP: 2 gloo processes on CPU (forked, see tests/ddp_worker.py) against a 1-process run.

Tolerance: a DDP gradient is the mean of two per-process gradients computed on half batches and summed by gloo's
all-reduce; the 1-process gradient sums the same examples inside one matmul. The fp32 sums differ in rounding order
only (measured: 7e-9 on gradients, 1.3e-8 on weights after 3 AdamW steps of lr 1e-3). ``ATOL = 1e-5`` on weights
(1e-6 on gradients) is ~100x the measured drift and 100x smaller than one optimizer step (~lr). Checked by mutation:
a rank-local entropy threshold (no all-gather) moves the weights by 3.6e-3 and the gradients by 7e-3. Adam's update
depends mostly on the gradient's sign, so the gradient comparison is the one that catches scale errors (a sum
instead of a mean over processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.distributed import agree_on_mask, check_masks_agree, mask_digests
from sparse_rl.entropy import entropy_quantile_threshold
from sparse_rl.mask import SubnetworkMask
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


def test_gradient_discovery_broadcasts_rank_zero_mask(two_processes):
    first, second = two_processes["grpo_gradient"]
    # each rank probed its own prompts, so their own masks differ; both train with rank 0's
    assert first["local_mask"] != second["local_mask"]
    assert first["mask"] == first["local_mask"]
    assert second["mask"] == first["local_mask"]


def test_different_seeded_masks_are_refused_on_every_rank(two_processes):
    for rank in two_processes["dpo"]:
        assert "rank 1 holds a different mask than rank 0" in rank["refusal"]
        assert "use the same seed and mask file everywhere" in rank["refusal"]
        assert rank["sparsified_after_refusal"] is False
    for rank in two_processes["collectives"]:
        assert "rank 1 holds a different mask than rank 0 (1 tensor(s) differ, first 'a')" in rank["check_one_bit"]
        assert "rank 1 built a mask over different parameters than rank 0 (it has 'c'" in rank[
            "broadcast_structure"]


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
    assert first["mask"] == second["mask"] and first["local_mask"] != second["local_mask"]


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
