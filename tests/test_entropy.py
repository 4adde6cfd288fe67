"""High-entropy token selection: the threshold, the gradient restriction, and its place in every TRL trainer."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trl.trainer.utils import add_fused_lm_head

from sparse_rl import SparseConfig, sparsify
from sparse_rl.discovery import probe_trainer_state
from sparse_rl.restrict.tokens import (
    HighEntropyTokens,
    entropy_quantile_threshold,
    keep_gradient_of,
    select_high_entropy_tokens,
)
from sparse_rl.trl.patches import restrict_fused_forward
from tests.tiny import make_tiny_model
from tests.trl_cases import TOKEN_TRAINERS, build_trainer


# ---------------------------------------------------------------------------------------------- selection
def test_selects_the_known_highest_entropy_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 5.0], [0.7, 0.3, 0.2, 0.8]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])  # 5.0 is padding: never kept
    selection = select_high_entropy_tokens(entropy, valid, quantile=0.5)
    # 7 valid tokens: keep 1 + floor(0.5 * 6) = 4, the highest ones: 0.9, 0.8, 0.7, 0.5
    assert torch.equal(selection.keep, torch.tensor([[False, True, True, False], [True, False, False, True]]))
    assert (selection.num_kept, selection.num_valid) == (4, 7)
    assert selection.threshold == pytest.approx(0.5)


def test_quantile_extremes():
    entropy = torch.tensor([0.3, 0.1, 0.2])
    valid = torch.ones(3, dtype=torch.bool)
    assert select_high_entropy_tokens(entropy, valid, 1.0).keep.all()
    assert torch.equal(select_high_entropy_tokens(entropy, valid, 0.0).keep, torch.tensor([True, False, False]))
    empty = select_high_entropy_tokens(entropy, torch.zeros(3, dtype=torch.bool), 0.2)
    assert not empty.keep.any() and empty.num_valid == 0 and math.isnan(empty.threshold)


@pytest.mark.parametrize("quantile", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0, 1 / 3])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_threshold_is_bit_identical_to_torch_quantile(quantile, n):
    generator = torch.Generator().manual_seed(n)
    for values in (torch.rand(n, generator=generator), torch.randint(0, 4, (n,), generator=generator).float()):
        assert torch.equal(entropy_quantile_threshold(values, quantile), torch.quantile(values, 1 - quantile))


def test_threshold_works_where_torch_quantile_refuses():
    values = torch.arange(2**24 + 1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(values, 0.8)
    assert float(entropy_quantile_threshold(values, 0.2)) == pytest.approx(0.8 * 2**24)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="entropy_quantile must be in"):
        SparseConfig(entropy_quantile=1.5)
    with pytest.raises(ValueError, match="same shape"):
        select_high_entropy_tokens(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool), 0.2)


def test_keep_gradient_of_keeps_values_and_routes_gradient():
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    kept = keep_gradient_of(values, torch.tensor([True, False, True]))
    assert torch.equal(kept, values)
    kept.sum().backward()
    assert torch.equal(values.grad, torch.tensor([1.0, 0.0, 1.0]))


def _gather_worker(rank: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(rank)
        entropy = torch.rand(3 + rank, 5, generator=generator) + rank  # rank 1 holds the higher entropies
        valid = torch.rand(3 + rank, 5, generator=generator) > 0.2
        selection = select_high_entropy_tokens(entropy, valid, 0.2)
        results[rank] = (entropy, valid, selection.keep, selection.threshold, selection.num_kept,
                         selection.num_valid)
    finally:
        dist.destroy_process_group()


def test_threshold_is_computed_over_all_processes(tmp_path):
    results = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True,
                       start_method="fork")  # fork: the children need not import transformers again
    everything = torch.cat([results[r][0][results[r][1]] for r in range(2)])
    expected = float(torch.quantile(everything, 0.8))
    for rank in range(2):
        entropy, valid, keep, threshold, num_kept, num_valid = results[rank]
        assert threshold == expected and num_valid == everything.numel()
        assert num_kept == int((everything >= expected).sum())
        assert torch.equal(keep, valid & (entropy >= expected))
    # The batch-wide threshold differs from what rank 0 alone would pick: rank 0 keeps (almost) nothing
    local_only = select_high_entropy_tokens(results[0][0], results[0][1], 0.2)
    assert int(results[0][2].sum()) < int(local_only.keep.sum())


# ---------------------------------------------------------------------------------------------- fused forward
def test_gradient_flows_only_from_kept_tokens():
    """Hand-built: with the kept tokens known, the restricted gradient equals the gradient of those tokens alone."""
    model = make_tiny_model()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(4, 28, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 7:] = -100  # padding

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    valid = reference.label_mask
    entropies = reference.entropy[valid].detach()
    num_kept = 1 + math.floor(0.25 * (entropies.numel() - 1))
    keep = valid & (reference.entropy.detach() >= entropies.topk(num_kept).values.min())
    assert 0 < int(keep.sum()) < int(valid.sum())
    expected = grads_of(-(reference.log_probs * keep).sum())
    expected_from_loss = grads_of(-(reference.log_probs * keep).sum() / valid.sum())

    tokens = HighEntropyTokens(0.25)
    undo = restrict_fused_forward(model, tokens)
    restricted = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert torch.equal(restricted.log_probs, reference.log_probs)  # forward values unchanged
    assert torch.equal(restricted.loss, reference.loss)
    actual = grads_of(-restricted.log_probs.sum())
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    restricted = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    for name, grad in grads_of(restricted.loss).items():
        torch.testing.assert_close(grad, expected_from_loss[name], rtol=1e-5, atol=1e-8)
    assert tokens.pop_metrics()["sparse/entropy_kept_fraction"] == pytest.approx(num_kept / int(valid.sum()))

    with torch.no_grad():  # reference / old-policy forwards: untouched, nothing recorded
        model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert tokens.pop_metrics() == {}
    undo()
    assert "fused_lm_head" in model.forward.__func__.__code__.co_varnames  # TRL's own patch is back


# ---------------------------------------------------------------------------------------------- every trainer
def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    if "online_dpo" in type(trainer).__module__:
        torch.manual_seed(0)  # training_step generates the completions itself
        loss = trainer.training_step(trainer.model, inputs)
    else:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _fixed_inputs(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    if "online_dpo" in type(trainer).__module__:
        return batch
    trainer.model.train()
    return trainer._prepare_inputs(batch)  # GRPO/RLOO generate here, once for both losses


@pytest.mark.parametrize("name", TOKEN_TRAINERS)
def test_restriction_keeps_forward_values_and_changes_gradient(name, tiny_checkpoint, tmp_path):
    trainer = build_trainer(name, tiny_checkpoint, tmp_path)
    with probe_trainer_state(trainer):
        inputs = _fixed_inputs(trainer)
        dense_loss, dense_grads = _loss_and_grads(trainer, inputs)
        sparse = sparsify(trainer, SparseConfig(density=1.0, discovery="random", entropy_quantile=0.2,
                                                compact_grads=False))
        loss, grads = _loss_and_grads(trainer, inputs)
    assert torch.equal(loss, dense_loss), "the restriction changed the forward value of the loss"
    assert grads.keys() == dense_grads.keys()
    assert any(not torch.equal(grads[n], dense_grads[n]) for n in grads), "the gradient was not restricted"
    metrics = sparse.entropy_tokens.pop_metrics()
    assert 0.1 < metrics["sparse/entropy_kept_fraction"] < 0.4


@pytest.mark.parametrize("name", ["grpo", "gmpo"])
def test_grpo_gradient_equals_trl_top_entropy_quantile(name, tiny_checkpoint, tmp_path):
    """With TRL's defaults (beta=0, no entropy bonus) sparse_rl's restriction and TRL's own top_entropy_quantile
    give the same gradient; for GMPO, TRL's mask also renormalises the geometric mean, so only GRPO must match."""
    trainer = build_trainer(name, tiny_checkpoint, tmp_path)
    with probe_trainer_state(trainer):
        inputs = _fixed_inputs(trainer)
        trainer.top_entropy_quantile = 0.2
        _, trl_grads = _loss_and_grads(trainer, inputs)
        trainer.top_entropy_quantile = 1.0
        sparsify(trainer, SparseConfig(density=1.0, discovery="random", entropy_quantile=0.2, compact_grads=False))
        _, grads = _loss_and_grads(trainer, inputs)
    assert grads.keys() == trl_grads.keys()
    same = all(torch.equal(grads[n], trl_grads[n]) for n in grads)  # bit for bit
    assert same == (name == "grpo")


def test_entropy_metrics_are_logged(tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    sparsify(trainer, SparseConfig(density=0.2, discovery="random", entropy_quantile=0.2))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "sparse/entropy_kept_fraction" in e]
    assert len(logged) == 2
    for entry in logged:
        assert 0.1 < entry["sparse/entropy_kept_fraction"] < 0.4
        assert entry["sparse/entropy_threshold"] > 0
