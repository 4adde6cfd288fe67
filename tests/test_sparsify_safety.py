"""sparsify refuses masks over frozen tensors and late calls, and can skip steps with non-finite gradients."""

import pytest
import torch

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.optim import unwrap_optimizer
from tests.trl_cases import build_trainer, snapshot


def test_a_mask_over_a_frozen_parameter_is_refused(tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    mask = random_mask(trainer.model, 0.1, seed=1)  # drawn while every tensor is trainable
    trainer.model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(UnsupportedTrainerSetup, match="'model.embed_tokens.weight'.*requires_grad=False"):
        sparsify(trainer, SparseConfig(mask=mask))
    assert trainer.optimizer_cls_and_kwargs is None and getattr(trainer, "sparse_training", None) is None


def test_sparsify_after_train_names_the_problem(tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path, max_steps=1)
    trainer.train()
    with pytest.raises(UnsupportedTrainerSetup, match="already trained 1 steps.*call sparsify before train"):
        sparsify(trainer, SparseConfig(discovery="random"))


def _poison_step(trainer, step: int):
    compute_loss = trainer.compute_loss

    def poisoned(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        return loss * float("nan") if trainer.state.global_step + 1 == step else loss

    trainer.compute_loss = poisoned


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_a_step_with_nan_gradients(skip, tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path, max_steps=3, max_grad_norm=1.0)
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.2, seed=1, skip_nonfinite_steps=skip))
    before = snapshot(trainer.model)
    _poison_step(trainer, 2)
    trainer.train()
    mask = sparse.mask
    for name, param in trainer.model.named_parameters():
        outside = ~mask[name] if name in mask else torch.ones_like(param, dtype=torch.bool)
        assert torch.equal(param[outside], before[name][outside]), name  # never written either way
    selected = torch.cat([p.detach()[mask[n]] for n, p in trainer.model.named_parameters() if n in mask])
    if skip:
        assert torch.isfinite(selected).all()
        assert unwrap_optimizer(trainer.optimizer).skipped_steps == 1
        logs = trainer.state.log_history
        assert [entry["sparse/skipped_steps"] for entry in logs if "sparse/skipped_steps" in entry] == [0, 1, 1]
    else:  # documented: clipping by a NaN norm spreads the NaN to every selected entry
        assert torch.isnan(selected).all()
