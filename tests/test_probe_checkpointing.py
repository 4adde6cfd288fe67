"""The trainer probe checkpoints activations when the trainer's ``train()`` will (``args.activation_checkpointing``,
TRL's default): transformers turns it on only inside ``train()``, after ``sparsify`` has probed, so without this the
probe held every layer's activations. The mask is the same and the model is left as it was."""

from __future__ import annotations

import pytest

from sparse_rl.discovery import ProbeOptions, gradient_mask_from_trainer
from tests.trl_cases import build_trainer


def _spy_on_checkpointing(trainer) -> list[bool]:
    """Whether the model checkpoints activations (and is in training mode, which transformers' layers need for it)
    at every ``compute_loss`` call."""
    seen, original = [], trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        seen.append(trainer.model.is_activation_checkpointing and trainer.model.training)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


@pytest.mark.parametrize("passes", [1, 2])
def test_probe_checkpoints_like_training_and_gives_the_same_mask(tiny_checkpoint, tmp_path, passes):
    masks = {}
    for checkpointing in (True, False):
        trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / f"c{checkpointing}",
                                activation_checkpointing=checkpointing)
        assert not trainer.model.is_activation_checkpointing  # Trainer enables it in train(), not before
        seen = _spy_on_checkpointing(trainer)
        masks[checkpointing] = gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, passes=passes))
        assert seen == [checkpointing] * 2 * passes
        # left as it was: train() enables it as usual, and no input-gradient hook stays behind
        assert not trainer.model.is_activation_checkpointing
        assert not getattr(trainer.model, "_require_grads_hooks", None)
    assert masks[True] == masks[False]


def test_a_model_that_already_checkpoints_keeps_checkpointing(tiny_checkpoint, tmp_path):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / "on", activation_checkpointing=True)
    trainer.model.activation_checkpointing_enable()
    hooks = len(trainer.model._require_grads_hooks)
    seen = _spy_on_checkpointing(trainer)
    gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=1))
    assert seen == [True]
    # (TRL's generation switches checkpointing off and on again, which registers the hook anew: count, not identity)
    assert trainer.model.is_activation_checkpointing and len(trainer.model._require_grads_hooks) == hooks > 0


def test_a_failed_probe_switches_checkpointing_back_off(tiny_checkpoint, tmp_path):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / "fail", activation_checkpointing=True)

    def failing(*args, **kwargs):
        assert trainer.model.is_activation_checkpointing
        raise RuntimeError("loss failed")

    trainer.compute_loss = failing
    with pytest.raises(RuntimeError, match="loss failed"):
        gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=1))
    assert not trainer.model.is_activation_checkpointing
    assert not getattr(trainer.model, "_require_grads_hooks", None)
