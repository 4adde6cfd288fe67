"""Probe discovery: every score finds a planted signal, the Adam score equals real Adam steps, weights stay put."""

import pytest
import torch

from sparse_rl.discovery import (
    ProbeOptions,
    accumulate_gradient_scores,
    gradient_mask,
    gradient_mask_from_trainer,
    half_ulp,
    precision_scores,
)
from tests.tiny import make_tiny_model
from tests.trl_cases import build_trainer, snapshot

PLANTED_TENSOR = "model.layers.1.mlp.up_proj.weight"
PLANTED_ENTRIES = torch.tensor([3, 70, 555, 1000, 2047])


def _planted_loss(model, weight=50.0):
    """Language-model loss on a fresh random batch each step, plus a term whose gradient is large and constant on
    a few planted entries: every score must rank them on top of their tensor."""
    planted = dict(model.named_parameters())[PLANTED_TENSOR]

    def loss_fn(step):
        generator = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(4, model.config.vocab_size, (4, 12), generator=generator)
        lm_loss = model(input_ids=ids, labels=ids).loss
        return lm_loss + weight * planted.reshape(-1)[PLANTED_ENTRIES].sum()

    return loss_fn


@pytest.mark.parametrize("score", ["gradient", "fisher", "adam"])
def test_probe_finds_planted_signal(score):
    model = make_tiny_model()
    before = snapshot(model)
    mask = gradient_mask(model, _planted_loss(model), density=0.01, options=ProbeOptions(steps=5, score=score))
    selected = mask[PLANTED_TENSOR].reshape(-1)
    assert bool(selected[PLANTED_ENTRIES].all())
    assert int(selected.sum()) == -(-selected.numel() // 100)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the probe changed weights"
    assert all(p.grad is None for p in model.parameters()), "gradients were not restored"


def test_scores_match_independent_computation():
    """A linear loss has weight-independent gradients, so real torch.optim.Adam steps on a copy move each entry by
    exactly the displacement the "adam" score predicts, whatever the weights do meanwhile."""
    model = make_tiny_model()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    directions = [{n: torch.randn(p.shape, generator=generator) for n, p in params.items()} for _ in range(4)]

    skipped = "model.layers.0.mlp.down_proj.weight"  # outside the graph at step 0: Adam skips it there

    def loss_fn(step):
        return sum((p * directions[step][n]).sum() for n, p in params.items() if (step, n) != (0, skipped))

    grad_sum = accumulate_gradient_scores(model, loss_fn, ProbeOptions(steps=4, score="gradient"))
    fisher = accumulate_gradient_scores(model, loss_fn, ProbeOptions(steps=4, score="fisher"))
    adam = accumulate_gradient_scores(model, loss_fn, ProbeOptions(steps=4, score="adam", betas=(0.8, 0.99), eps=1e-6))
    lr = 1e-3
    precision = accumulate_gradient_scores(model, loss_fn, ProbeOptions(steps=4, score="precision", betas=(0.8, 0.99),
                                                                        eps=1e-6, lr=lr))

    replica = {n: p.detach().clone().double().requires_grad_(True) for n, p in params.items()}
    optimizer = torch.optim.Adam(list(replica.values()), lr=1.0, betas=(0.8, 0.99), eps=1e-6)
    for step in range(4):
        optimizer.zero_grad()
        sum((p * directions[step][n].double()).sum() for n, p in replica.items()
            if (step, n) != (0, skipped)).backward()
        optimizer.step()
    for name, param in params.items():
        used = directions[1:] if name == skipped else directions
        torch.testing.assert_close(grad_sum[name], sum(d[name].abs() for d in used))
        torch.testing.assert_close(fisher[name], sum(d[name] ** 2 for d in used))
        displacement = (replica[name].detach() - param.detach().double()).abs().float()
        torch.testing.assert_close(adam[name], displacement, rtol=1e-4, atol=1e-5)
        bf16_step = lr * displacement / half_ulp(param.detach(), torch.bfloat16)
        torch.testing.assert_close(precision[name], bf16_step, rtol=1e-4, atol=1e-5)


def test_half_ulp_predicts_bf16_rounding():
    """Above 1 the update survives round-to-nearest bf16, below 0.5 it never does (whatever the direction)."""
    generator = torch.Generator().manual_seed(0)
    weights = (torch.randn(20000, generator=generator) * 0.05).to(torch.bfloat16)
    updates = torch.randn(20000, generator=generator) * 2e-4
    score = precision_scores({"w": updates}, {"w": weights})["w"]
    changed = (weights.float() + updates).to(torch.bfloat16) != weights
    assert bool(changed[score > 1.0].all())
    assert not bool(changed[score < 0.5].any())
    assert 0.05 < float((score > 1).float().mean()) < 0.95  # both sides are exercised


def test_probe_bad_inputs():
    model = make_tiny_model()
    loss_fn = _planted_loss(model)
    with pytest.raises(ValueError, match="score must be one of"):
        gradient_mask(model, loss_fn, 0.1, ProbeOptions(steps=1, score="hessian"))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        gradient_mask(model, loss_fn, 0.1, ProbeOptions(steps=0))
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        gradient_mask(model, loss_fn, 1.01)
    with pytest.raises(ValueError, match="no weight for 'x'"):
        precision_scores({"x": torch.ones(2)}, model)


def test_probe_options_fill_only_unset_adamw_hyperparameters():
    options = ProbeOptions(betas=(0.5, 0.6))
    filled = options.with_adamw_defaults(lr=1e-3, betas=(0.9, 0.99), eps=1e-7)
    assert (filled.lr, filled.betas, filled.eps) == (1e-3, (0.5, 0.6), 1e-7)
    assert options.lr is None and options.eps is None, "with_adamw_defaults changed the options it copies"


def test_probe_refuses_options_of_another_type():
    """The step count is no longer a positional argument: passing it there names the options class instead."""
    model = make_tiny_model()
    with pytest.raises(TypeError, match=r"ProbeOptions \(e\.g\. ProbeOptions\(steps=4"):
        accumulate_gradient_scores(model, _planted_loss(model), 4)
    with pytest.raises(TypeError, match="ProbeOptions"):
        gradient_mask(model, _planted_loss(model), 0.1, {"steps": 2})


def _grpo_trainer(tiny_checkpoint, tmp_path, **overrides):
    return build_trainer("grpo", tiny_checkpoint, tmp_path / "out", max_steps=1, **overrides)


def test_trainer_probe_adam_score_leaves_trainer_untouched(tiny_checkpoint, tmp_path):
    trainer = _grpo_trainer(tiny_checkpoint, tmp_path)
    before = snapshot(trainer.model)
    mask = gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, score="precision", budget="global"),
                                      exclude=("embed_tokens",))
    assert "model.embed_tokens.weight" not in mask
    assert mask.num_selected == -(-mask.num_total // 10)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert trainer.state.global_step == 0


def test_trainer_probe_takes_unset_adamw_hyperparameters_from_the_trainer(tiny_checkpoint, tmp_path):
    """Unset betas/eps are the trainer's (the same mask as passing them, not the one of the probe's own defaults),
    and set ones override them."""
    trainer = _grpo_trainer(tiny_checkpoint, tmp_path, adam_beta1=0.5, adam_beta2=0.6, adam_epsilon=1.0)
    from_args = gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, score="adam"))
    explicit = gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, score="adam", betas=(0.5, 0.6), eps=1.0))
    overridden = gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, score="adam", betas=(0.9, 0.999),
                                                                        eps=1e-8))
    assert from_args == explicit
    assert overridden != from_args, "the probe's default betas/eps should rank entries differently from the trainer's"
