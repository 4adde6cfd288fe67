"""The gradient probe in several passes (``ProbeOptions.passes``): the same mask as one pass, a share of the scores
and gradients per pass, the model and trainer left as they were, and a clear refusal where it cannot run."""

from __future__ import annotations

import pytest
import torch

import sparse_rl.discovery.probe as probe
from sparse_rl.discovery import ProbeOptions, gradient_mask, gradient_mask_from_trainer
from sparse_rl.discovery.probe import parameter_groups
from tests.tiny import make_tiny_model
from tests.trl_cases import build_trainer, snapshot


def _fixed_batches_loss(model, record=None):
    """Language-model loss on batch ``step`` (the same batch whenever ``step`` repeats); ``record`` collects the
    numel of the parameters requiring a gradient at each call."""

    def loss_fn(step):
        if record is not None:
            record.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        generator = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(4, model.config.vocab_size, (4, 12), generator=generator)
        return model(input_ids=ids, labels=ids).loss

    return loss_fn


@pytest.mark.parametrize("score,budget", [("gradient", "per_tensor"), ("fisher", "global"), ("adam", "per_tensor"),
                                          ("precision", "global")])
def test_passes_give_the_one_pass_mask(score, budget):
    model = make_tiny_model()
    options = ProbeOptions(steps=3, score=score, budget=budget, lr=1e-3)
    one = gradient_mask(model, _fixed_batches_loss(model), 0.1, options)
    calls = []
    three = gradient_mask(model, _fixed_batches_loss(model, calls), 0.1, ProbeOptions(**{**vars(options), "passes": 3}))
    assert three == one
    assert list(three) == list(one)  # same tensors, same order
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    assert len(calls) == 3 * options.steps
    # each pass computes gradients for its share only: about a third of the entries (whole tensors)
    assert all(n <= total / 3 + largest for n in calls) and min(calls) < total


def test_passes_leave_flags_grads_and_weights_as_they_were():
    model = make_tiny_model()
    frozen = "model.layers.0.mlp.gate_proj.weight"
    params = dict(model.named_parameters())
    params[frozen].requires_grad_(False)
    holder = params["model.norm.weight"]  # a gradient that existed before the probe is put back
    kept = torch.randn_like(holder)
    holder.grad = kept.clone()
    before = snapshot(model)
    mask = gradient_mask(model, _fixed_batches_loss(model), 0.2, ProbeOptions(steps=2, passes=4))
    assert frozen not in mask
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {frozen}
    assert torch.equal(holder.grad, kept)
    assert all(p.grad is None for p in model.parameters() if p is not holder)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_parameter_groups_cut_in_order_into_balanced_runs():
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(size))) for i, size in enumerate([10, 10, 40, 10, 10, 10, 10])]
    groups = parameter_groups(params, 2)
    assert groups == [["p0", "p1", "p2"], ["p3", "p4", "p5", "p6"]]  # 60 and 40 of 100: whole tensors
    assert [n for g in parameter_groups(params, 3) for n in g] == [n for n, _ in params]
    assert len(parameter_groups(params, 3)) == 3
    assert parameter_groups(params, 20) == [[n] for n, _ in params]  # more passes than tensors: one per tensor
    assert parameter_groups(params, 1) == [[n for n, _ in params]]


def test_trainer_probe_in_passes_prepares_each_batch_once_and_matches_one_pass(tiny_checkpoint, tmp_path):
    """GRPO generates completions in ``_prepare_inputs``: a probe in passes must score every pass on the same
    generations (each batch prepared once) to give the one-pass mask."""
    masks, prepared = [], []
    for passes in (1, 3):
        trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / f"p{passes}")
        original = trainer._prepare_inputs
        calls = []

        def counting(batch, original=original, calls=calls):
            calls.append(1)
            return original(batch)

        trainer._prepare_inputs = counting
        before = snapshot(trainer.model)
        masks.append(gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=2, passes=passes)))
        prepared.append(len(calls))
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        assert all(p.requires_grad for p in trainer.model.parameters())
        assert trainer.state.global_step == 0
    assert prepared == [2, 2]
    assert masks[0] == masks[1]


def test_passes_are_refused_under_torch_distributed(monkeypatch):
    model = make_tiny_model()
    monkeypatch.setattr(probe, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="passes > 1 runs in one process only"):
        gradient_mask(model, _fixed_batches_loss(model), 0.1, ProbeOptions(passes=2))


@pytest.mark.parametrize("passes", [0, -1, 1.5, True, "2"])
def test_bad_passes_are_refused(passes):
    with pytest.raises(ValueError, match="passes must be a positive integer"):
        ProbeOptions(passes=passes)


def test_a_failed_pass_leaves_every_flag_restored():
    """NaN scores are refused (naming the tensor) and no parameter is left with requires_grad switched off."""
    model = make_tiny_model()
    loss = _fixed_batches_loss(model)
    with pytest.raises(ValueError, match="contain NaN or inf"):
        gradient_mask(model, lambda step: loss(step) * float("nan"), 0.1, ProbeOptions(steps=1, passes=2))
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
