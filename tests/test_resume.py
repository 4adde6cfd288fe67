"""Checkpoints carry the mask and the compact optimizer state; resuming reaches the uninterrupted run bit for bit, and
a checkpoint saved with another mask (or without one) is refused before anything is loaded."""

import pytest
import torch

from sparse_rl import SparseConfig, SubnetworkMask, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.trl import MASK_FILE_NAME
from tests.trl_cases import build_trainer, snapshot

CHECKPOINTING = dict(max_steps=4, save_strategy="steps", save_steps=2)


@pytest.mark.parametrize("name, dtype, compact", [("sft", None, False), ("sft", torch.bfloat16, False),
                                                   ("grpo", None, False), ("grpo", None, True)],
                         ids=["sft-fp32", "sft-bf16-master", "grpo-fp32", "grpo-fp32-compact-grads"])
def test_resume_equals_uninterrupted_run(name, dtype, compact, tiny_checkpoint, tmp_path):
    full = build_trainer(name, tiny_checkpoint, tmp_path / "full", dtype=dtype, **CHECKPOINTING)
    mask = random_mask(full.model, 0.1, seed=3)
    sparsify(full, SparseConfig(mask=mask, compact_grads=compact))
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert SubnetworkMask.load(checkpoint / MASK_FILE_NAME) == mask

    # The optimizer state in the checkpoint is compact: one moment entry per selected entry, nothing more
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    selected = sum(int(mask[n].sum()) for n, p in full.model.named_parameters() if p.requires_grad)
    assert sum(state["exp_avg"].numel() for state in saved["state"].values()) == selected

    resumed = build_trainer(name, tiny_checkpoint, tmp_path / "resumed", dtype=dtype, **CHECKPOINTING)
    sparsify(resumed, SparseConfig(mask=str(checkpoint / MASK_FILE_NAME), compact_grads=compact))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = snapshot(full.model)
    for name_, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name_]), f"{name_} differs after resume"


def _checkpoint(tiny_checkpoint, tmp_path, mask=None):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path / "first", max_steps=1, save_strategy="steps",
                            save_steps=1)
    if mask is not None:
        sparsify(trainer, SparseConfig(mask=mask))
    trainer.train()
    return tmp_path / "first" / "checkpoint-1"


@pytest.mark.parametrize("saved_with", ["other-mask", "no-mask"])
def test_resume_refuses_checkpoint_of_another_mask(saved_with, tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path / "second", max_steps=2)
    mask = random_mask(trainer.model, 0.1, seed=3)
    other = random_mask(trainer.model, 0.1, seed=4) if saved_with == "other-mask" else None
    checkpoint = _checkpoint(tiny_checkpoint, tmp_path, other)
    sparsify(trainer, SparseConfig(mask=mask))
    before = snapshot(trainer.model)
    message = "differs from this trainer's mask" if other is not None else "has no sparse_mask.safetensors"
    with pytest.raises(UnsupportedTrainerSetup, match=message):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()), "weights were loaded"
