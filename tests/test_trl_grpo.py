"""GRPOTrainer specifics: gradient discovery on the real loss, a mask loaded from disk, a user optimizer passed to the
constructor. Every trainer with and without the plugin: test_trl_trainers.py; other refusals: test_trl_refusals.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import ProbeOptions, random_mask
from tests.tiny import length_reward, make_tiny_tokenizer, prompt_dataset


def _grpo_trainer(checkpoint, tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=3, learning_rate=5e-2, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=0, temperature=1.0,
    )
    args.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return GRPOTrainer(model=model, reward_funcs=length_reward, args=GRPOConfig(**args),
                       train_dataset=prompt_dataset(), processing_class=make_tiny_tokenizer())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n: (p.detach() != before[n]) for n, p in model.named_parameters()}


def test_gradient_discovery_then_only_selected_entries_change(tiny_checkpoint, tmp_path):
    """The default discovery probes GRPO's own loss without changing weights; the dense counterpart and the other
    trainers are in test_trl_trainers.py."""
    trainer = _grpo_trainer(tiny_checkpoint, tmp_path)
    before = _snapshot(trainer.model)
    sparse = sparsify(trainer, SparseConfig(density=0.1, discovery="gradient", probe=ProbeOptions(steps=2)))
    assert _snapshot(trainer.model).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(trainer.model).items()), "probe changed weights"
    trainer.train()
    changed = _changed(before, trainer.model)
    unselected_changes = sum(int((c & ~sparse.mask[n]).sum()) for n, c in changed.items())
    selected_changes = sum(int((c & sparse.mask[n]).sum()) for n, c in changed.items())
    assert unselected_changes == 0
    assert selected_changes > 0.5 * sparse.mask.num_selected
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
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                      bf16=False, report_to="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=prompt_dataset(),
                          processing_class=make_tiny_tokenizer(), optimizers=(optimizer, None))
    with pytest.raises(UnsupportedTrainerSetup, match="optimizers="):
        sparsify(trainer, SparseConfig(discovery="random"))
