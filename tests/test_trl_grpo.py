"""GRPOTrainer specifics: gradient discovery on the real loss, a mask loaded from disk, a user optimizer passed to the
constructor. Every trainer with and without the plugin: test_trl_trainers.py; other refusals: test_trl_refusals.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import ProbeOptions, random_mask
from tests.trl_cases import build_trainer, changed_entries, snapshot


def _grpo_trainer(checkpoint, tmp_path, **overrides):
    return build_trainer("grpo", checkpoint, tmp_path / "out", **{"max_steps": 3, "learning_rate": 5e-2, **overrides})


def test_gradient_discovery_then_only_selected_entries_change(tiny_checkpoint, tmp_path):
    """The default discovery probes GRPO's own loss without changing weights; the dense counterpart and the other
    trainers are in test_trl_trainers.py."""
    trainer = _grpo_trainer(tiny_checkpoint, tmp_path)
    before = snapshot(trainer.model)
    sparse = sparsify(trainer, SparseConfig(density=0.1, discovery="gradient", probe=ProbeOptions(steps=2)))
    assert snapshot(trainer.model).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in snapshot(trainer.model).items()), "probe changed weights"
    trainer.train()
    assert changed_entries(before, trainer.model, sparse.mask, selected=False) == 0
    assert changed_entries(before, trainer.model, sparse.mask, selected=True) > 0.5 * sparse.mask.num_selected
    logged = [entry for entry in trainer.state.log_history if "sparse/trained_fraction" in entry]
    assert logged and abs(logged[0]["sparse/trained_fraction"] - sparse.trained_fraction) < 1e-12
    assert 0 < logged[0]["sparse/optimizer_state_bytes"]


def test_saved_mask_is_used(tiny_checkpoint, tmp_path):
    trainer = _grpo_trainer(tiny_checkpoint, tmp_path, max_steps=1)
    mask = random_mask(trainer.model, 0.05, seed=7)
    mask.save(tmp_path / "mask.safetensors")
    sparse = sparsify(trainer, SparseConfig(mask=str(tmp_path / "mask.safetensors")))
    assert sparse.mask == mask


def test_refuses_user_optimizer(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path, model=model,
                            trainer_kwargs={"optimizers": (optimizer, None)})
    with pytest.raises(UnsupportedTrainerSetup, match="optimizers="):
        sparsify(trainer, SparseConfig(discovery="random"))
