"""FSDP2 (``fully_shard``): masked training on sharded parameters, 2 gloo processes on CPU.

One ``torchrun`` launch of tests/fsdp_worker.py trains the tiny Llama for ``STEPS`` steps with each decoder layer and
the root wrapped by ``fully_shard`` (as accelerate's transformer-layer policy does), each process on half of a fixed
batch; the reference is the same loop in this process, without FSDP, on the whole batch.

Tolerance: the sharded run sums the two half-batch gradients in a reduce-scatter (and halves them), the reference
takes one gradient of the whole batch, so gradients differ by fp32 rounding; after 3 clipped AdamW steps at lr 1e-2
parameters agree to ``ATOL`` (measured max difference: ~1.3e-6). Entries outside the mask are compared bit for bit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_rl import MaskedAdamW, SubnetworkMask
from sparse_rl.restrict.sharded import local_selection, restrict_sharded_gradient
from tests.fsdp_worker import (
    FROZEN,
    FULL,
    STEPS,
    global_batch,
    make_mask,
    make_model,
    sft_trainer,
    sparsify_sft,
    train_loop,
)
from tests.tiny import save_tiny_checkpoint
from tests.trl_cases import snapshot

ATOL = 1e-5
WORLD_SIZE = 2
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("fsdp-model") / "tiny-llama", vocab_size=31)


@pytest.fixture(scope="module")
def launch(tmp_path_factory, checkpoint) -> Path:
    """Both scenarios of tests/fsdp_worker.py in one ``torchrun`` launch (the imports dominate its ~40 s)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out), str(checkpoint)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return out


def _ranks(out: Path, scenario: str) -> list[dict]:
    return [torch.load(out / f"{scenario}-rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def sharded_run(launch) -> list[dict]:
    return _ranks(launch, "fully_shard")


@pytest.fixture(scope="module")
def trainer_run(launch) -> list[dict]:
    return _ranks(launch, "trainer")


@pytest.fixture(scope="module")
def reference():
    """One process, no FSDP, the whole batch: the run the sharded one must reproduce."""
    model = make_model()
    mask = make_mask(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = train_loop(model, mask, global_batch())
    return {"model": model, "mask": mask, "initial": initial, "grad_norms": run["grad_norms"]}


def test_parameters_match_single_process_run(sharded_run, reference):
    for rank, result in enumerate(sharded_run):
        for name, param in reference["model"].named_parameters():
            torch.testing.assert_close(result["full_final"][name], param.detach(), atol=ATOL, rtol=0,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")
        # The clipped norm is that of the masked gradient: it matches only if the shards were masked before clipping
        torch.testing.assert_close(result["grad_norms"], reference["grad_norms"], atol=0, rtol=1e-5)
    assert any(not torch.equal(sharded_run[0]["full_final"][n], reference["initial"][n]) for n in reference["mask"])


def test_unselected_entries_unchanged_on_every_rank(sharded_run, reference):
    for rank, result in enumerate(sharded_run):
        for name, keep in result["local_masks"].items():
            before, after = result["local_initial"][name], result["local_final"][name]
            assert torch.equal(after[~keep], before[~keep]), f"rank {rank}: {name} changed outside its mask"
            assert not torch.equal(after[keep], before[keep]) or not keep.any(), f"rank {rank}: {name} not trained"
        assert result["requires_grad"][FROZEN] is False
    mask = reference["mask"]
    for name, initial in reference["initial"].items():
        assert torch.equal(sharded_run[0]["full_final"][name][~mask[name]], initial[~mask[name]]), name


def test_masks_identical_and_cut_like_the_parameters(sharded_run, reference):
    assert sharded_run[0]["mask"] == sharded_run[1]["mask"] == reference["mask"]
    uneven = False
    for name, initial in reference["initial"].items():
        assert sharded_run[0]["placements"][name] == ["S(0)"], name
        # Shard(0): the local pieces, in rank order, are the full tensor; mask and parameter are cut at the same rows
        pieces = [result["local_masks"][name] for result in sharded_run]
        assert torch.equal(torch.cat(pieces), reference["mask"][name]), name
        assert torch.equal(torch.cat([result["local_initial"][name] for result in sharded_run]), initial), name
        uneven |= pieces[0].shape != pieces[1].shape
    assert uneven, "the tiny model should have a parameter whose rows do not split evenly (vocabulary of 31 rows)"


def test_sharded_gradients_are_masked(sharded_run):
    for result in sharded_run:
        assert result["grad_leaks"] and not any(result["grad_leaks"])


def test_compact_state_is_split_across_ranks(sharded_run, reference):
    mask = reference["mask"]
    trained = {name for name in mask if name != FROZEN}
    for result in sharded_run:
        assert set(result["local_selected"]) == trained
    for name in trained:
        assert sum(result["local_selected"][name] for result in sharded_run) == int(mask[name].sum()), name
    assert all(result["local_selected"][FULL] == result["local_masks"][FULL].numel() for result in sharded_run)


def test_state_dict_round_trips_on_every_rank(sharded_run):
    for result in sharded_run:
        assert result["reloaded_state"].keys() == result["state"].keys()
        for name, state in result["state"].items():
            for key, value in state.items():
                assert torch.equal(result["reloaded_state"][name][key], value), (name, key)
                assert result["reloaded_state"][name][key].dtype == value.dtype


def test_bf16_master_copies_hold_the_local_selected_entries(launch, reference):
    mask = reference["mask"]
    results = _ranks(launch, "bf16")
    for rank, result in enumerate(results):
        for name, master in result["master"].items():
            keep, final = result["local_masks"][name], result["local_final"][name]
            assert final.dtype == torch.bfloat16 and master.dtype == torch.float32
            # the parameter is its master copy rounded, entry for entry, on this rank's shard
            assert torch.equal(final[keep], master.to(torch.bfloat16)), f"rank {rank}: {name}"
            assert torch.equal(final[~keep], result["local_initial"][name][~keep]), f"rank {rank}: {name}"
    for name in results[0]["master"]:
        assert sum(result["master"][name].numel() for result in results) == int(mask[name].sum()), name
    assert any(not torch.equal(r["local_final"][n], r["local_initial"][n]) for r in results for n in r["master"])


# ------------------------------------------------------------------------------------------ Trainer + accelerate
@pytest.fixture(scope="module")
def trainer_reference(checkpoint, tmp_path_factory):
    """The same sparsified SFT run in one process, without FSDP, on the whole batch."""
    trainer = sft_trainer(checkpoint, tmp_path_factory.mktemp("sft-reference"), world_size=1, fsdp=False)
    initial = snapshot(trainer.model)
    sparse = sparsify_sft(trainer)
    trainer.train()
    return {"model": trainer.model, "mask": sparse.mask, "initial": initial,
            "grad_norms": [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]}


def test_trainer_fsdp2_matches_single_process_run(trainer_run, trainer_reference):
    mask = trainer_reference["mask"]
    for rank, result in enumerate(trainer_run):
        assert result["optimizer_params_sharded"], "accelerate did not hand MaskedAdamW the DTensor shards"
        assert all(placements == ["S(0)"] for placements in result["placements"].values())
        assert result["mask"] == mask
        for name, param in trainer_reference["model"].named_parameters():
            final = result["full_final"][name]
            torch.testing.assert_close(final, param.detach(), atol=ATOL, rtol=0,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")
            assert torch.equal(final[~mask[name]], trainer_reference["initial"][name][~mask[name]]), name
        torch.testing.assert_close(result["grad_norms"], trainer_reference["grad_norms"], atol=0, rtol=1e-5)
        assert len(result["grad_norms"]) == STEPS
    for name in mask:
        if mask[name].any():
            assert sum(result["local_selected"][name] for result in trainer_run) == int(mask[name].sum()), name


def _pretend_fsdp(monkeypatch, trainer, version: int) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)  # a shared singleton
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)


def test_fsdp1_is_refused_naming_fsdp2(checkpoint, tmp_path, monkeypatch):
    from sparse_rl import UnsupportedTrainerSetup

    trainer = sft_trainer(checkpoint, tmp_path, world_size=1, fsdp=False)
    _pretend_fsdp(monkeypatch, trainer, version=1)
    with pytest.raises(UnsupportedTrainerSetup, match=r"FSDP1 .*fsdp_config=\{'version': 2\}"):
        sparsify_sft(trainer)
    assert getattr(trainer, "sparse_training", None) is None


def test_fsdp2_optimizer_checkpoints_are_refused(checkpoint, tmp_path, monkeypatch):
    from sparse_rl import UnsupportedTrainerSetup

    trainer = sft_trainer(checkpoint, tmp_path, world_size=1, fsdp=False)
    _pretend_fsdp(monkeypatch, trainer, version=2)
    monkeypatch.setattr(trainer.args, "save_strategy", "steps")
    with pytest.raises(UnsupportedTrainerSetup, match="save_only_model=True"):
        sparsify_sft(trainer)
    monkeypatch.setattr(trainer.args, "save_only_model", True)
    assert sparsify_sft(trainer).mask.num_selected > 0


# ------------------------------------------------------------------------------------------ single process
def test_optimizer_follows_swapped_parameters():
    """accelerate's FSDP2 prepare replaces the optimizer's params after construction; the names stay. MaskedAdamW
    must step the new tensors, as if it had been built with them."""
    model, twin = make_model(), make_model()
    mask = make_mask(model)
    trained = lambda m: [(n, p) for n, p in m.named_parameters() if n != FROZEN]
    swapped = MaskedAdamW(trained(model), mask, lr=1e-2)
    direct = MaskedAdamW(trained(twin), mask, lr=1e-2)
    replacements = {n: torch.nn.Parameter(p.detach().clone()) for n, p in trained(model)}
    swapped.param_groups[0]["params"] = [replacements[n] for n in swapped.param_groups[0]["param_names"]]
    for (name, replacement), (_, param) in zip(replacements.items(), trained(twin)):
        replacement.grad = param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name)))
    swapped.step()
    direct.step()
    for (name, replacement), (_, param) in zip(replacements.items(), trained(twin)):
        assert torch.equal(replacement, param), name
    swapped.param_groups[0]["params"] = [p.detach().clone() for p in swapped.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="replaced after MaskedAdamW had stepped it"):
        swapped.step()


def test_plain_tensors_pass_through_and_bad_input_is_named():
    param = torch.nn.Parameter(torch.zeros(3, 4))
    selection = torch.rand(3, 4) < 0.5
    assert local_selection(param, selection) is selection
    with pytest.raises(ValueError, match=r"mask has shape \(4, 3\)"):
        local_selection(param, selection.T.contiguous())
    with pytest.raises(TypeError, match="expected a DTensor parameter"):
        restrict_sharded_gradient(param, selection)
    assert SubnetworkMask({"w": selection}) == SubnetworkMask({"w": local_selection(param, selection)})
