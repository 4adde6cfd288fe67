"""Every supported TRL trainer, with and without sparsify: only selected entries may change, and without the plugin
unselected ones do (so the test can fail). Variants cover a model passed by name, gradient accumulation, gradient
checkpointing and bf16 weights."""

import pytest
import torch

from sparse_rl import SparseConfig, sparsify
from sparse_rl.discovery import random_mask
from tests.trl_cases import TRAINERS, build_trainer, changed_entries, snapshot


def _train_sparse_and_check(trainer, mask, steps: int):
    before = snapshot(trainer.model)
    sparse = sparsify(trainer, SparseConfig(mask=mask))
    trainer.train()
    assert changed_entries(before, trainer.model, mask, selected=False) == 0, "an unselected entry changed"
    assert changed_entries(before, trainer.model, mask, selected=True) > 0.25 * mask.num_selected
    logged = [entry for entry in trainer.state.log_history if "sparse/trained_fraction" in entry]
    assert len(logged) == steps
    for entry in logged:
        assert entry["sparse/trained_fraction"] == pytest.approx(sparse.trained_fraction)
        assert entry["sparse/optimizer_state_bytes"] > 0
        assert entry["sparse/masked_grad_norm"] == entry["grad_norm"] > 0
    return sparse


@pytest.mark.parametrize("name", TRAINERS)
def test_only_selected_entries_change(name, tiny_checkpoint, tmp_path):
    dense = build_trainer(name, tiny_checkpoint, tmp_path / "dense", max_steps=1)
    mask = random_mask(dense.model, 0.1, seed=3)
    before = snapshot(dense.model)
    dense.train()
    assert changed_entries(before, dense.model, mask, selected=False) > 0, "without the plugin nothing is masked"

    trainer = build_trainer(name, tiny_checkpoint, tmp_path / "sparse")
    _train_sparse_and_check(trainer, mask, steps=2)


@pytest.mark.parametrize(
    "name, options",
    [
        ("grpo", dict(from_name=True, gradient_accumulation_steps=2)),
        ("dpo", dict(from_name=True, gradient_checkpointing=True)),
        ("sft", dict(gradient_accumulation_steps=2, gradient_checkpointing=True)),
    ],
    ids=["grpo-by-name-accumulation", "dpo-by-name-checkpointing", "sft-accumulation-checkpointing"],
)
def test_variants(name, options, tiny_checkpoint, tmp_path):
    trainer = build_trainer(name, tiny_checkpoint, tmp_path, **options)
    _train_sparse_and_check(trainer, random_mask(trainer.model, 0.1, seed=3), steps=2)


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_bf16_weights_train_through_master_copies(name, tiny_checkpoint, tmp_path):
    trainer = build_trainer(name, tiny_checkpoint, tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    mask = random_mask(trainer.model, 0.1, seed=3)
    sparse = _train_sparse_and_check(trainer, mask, steps=2)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    # Two fp32 moments plus an fp32 master copy per selected entry of a bf16 tensor
    selected = sum(int(mask[n].sum()) for n, p in trainer.model.named_parameters() if p.requires_grad)
    state_bytes = trainer.state.log_history[-2]["sparse/optimizer_state_bytes"]
    assert state_bytes >= 12 * selected
    assert sparse.mask is mask


def test_logged_grad_norm_is_the_masked_gradient(tiny_checkpoint, tmp_path):
    """Trainer's own grad_norm (and sparse/masked_grad_norm) is the norm of the masked gradient, before clipping."""
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path / "sparse", max_steps=1, max_grad_norm=1e-3)
    mask = random_mask(trainer.model, 0.1, seed=3)
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, args, kwargs))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    sparsify(trainer, SparseConfig(mask=mask))
    trainer.train()
    logged = trainer.state.log_history[0]["sparse/masked_grad_norm"]

    reference = build_trainer("sft", tiny_checkpoint, tmp_path / "dense")  # same initial weights, no plugin
    (inputs, args, kwargs), = seen
    reference.compute_loss(reference.model, inputs, *args, **kwargs).backward()
    grads = {n: p.grad for n, p in reference.model.named_parameters()}
    masked_norm = torch.sqrt(sum((g.double() * mask[n]).pow(2).sum() for n, g in grads.items()))
    dense_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
    assert logged == pytest.approx(float(masked_norm), rel=1e-5)
    assert float(dense_norm) > 1.5 * logged
