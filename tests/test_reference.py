"""SharedReference: equals a true copy of the base model, never disturbs the policy, and plugs into TRL trainers."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_rl import MaskedAdamW, SparseConfig, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.reference import SharedReference
from sparse_rl.restrict import restrict_gradients
from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_checkpoint
from tests.trl_cases import build_trainer

VOCAB = len(make_tiny_tokenizer().get_vocab())


def _inputs(seed=1, batch=3, length=9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=generator)


def _train_sparse(model, mask, steps=3, lr=5e-2):
    """A few masked AdamW steps so the policy moves away from its base at the selected entries."""
    restriction = restrict_gradients(model, mask)
    optimizer = MaskedAdamW(list((n, p) for n, p in model.named_parameters() if p.requires_grad), mask, lr=lr)
    for step in range(steps):
        ids = _inputs(seed=10 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    restriction.remove()


def _trained_policy(density, **config):
    """A tiny policy, a frozen copy of its base, a random mask of ``density`` and the policy's SharedReference, after
    a few masked AdamW steps moved the policy away from its base."""
    policy = make_tiny_model(**config)
    base = copy.deepcopy(policy).eval()
    mask = random_mask(policy, density)
    reference = SharedReference(policy, mask)
    _train_sparse(policy, mask)
    return policy, base, mask, reference


def _snapshot(model):
    return {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    for name, param in model.named_parameters():
        value, version = snapshot[name]
        assert torch.equal(param.detach(), value), f"{name} was not restored"
        assert param._version == version, f"{name}'s autograd version counter moved"


@pytest.mark.parametrize("tied", [False, True])
def test_reference_equals_base_copy_after_training(tied):
    policy, base, _, reference = _trained_policy(0.2, tie_word_embeddings=tied)
    ids = _inputs()
    with torch.no_grad():
        trained_logits = policy(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert not torch.allclose(trained_logits, base_logits), "training did not move the policy; the test is vacuous"
    snapshot = _snapshot(policy)
    reference_logits = reference(input_ids=ids).logits
    torch.testing.assert_close(reference_logits, base_logits, rtol=0, atol=0)
    _assert_unchanged(policy, snapshot)
    assert not reference_logits.requires_grad


def test_extra_memory_on_cpu_is_the_selected_values_alone():
    """On CPU the swap walks the mask's packed bits in place (no positions, no scratch): 4 bytes per fp32 entry."""
    policy = make_tiny_model()
    mask = random_mask(policy, 0.1)
    reference = SharedReference(policy, mask)
    assert reference.extra_bytes() == reference.value_bytes() == mask.num_selected * 4
    reference(input_ids=_inputs())
    assert reference.extra_bytes() == mask.num_selected * 4, "a swap allocated scratch memory or positions"
    assert list(reference.parameters()) == [], "the policy must not be a submodule of the reference"


def test_positions_off_the_packed_path_are_shared_with_compact_gradient_hooks(monkeypatch):
    """Where the packed bits cannot be walked (other devices, no numba), the reference and the compact gradient hooks
    keep one int32 position tensor per parameter, not one each; on CPU neither keeps any for plain matrices."""
    from sparse_rl.restrict import bitscan

    policy = make_tiny_model()
    mask = random_mask(policy, 0.1)
    restriction = restrict_gradients(policy, mask, compact=True)
    reference = SharedReference(policy, mask)
    assert restriction.held_bytes == 0 and not any(n.startswith("index_") for n, _ in reference.named_buffers())
    restriction.remove()

    monkeypatch.setattr(bitscan, "available", lambda: False)
    monkeypatch.setattr(bitscan, "walks", lambda param: False)
    restriction = restrict_gradients(policy, mask, compact=True)
    reference = SharedReference(policy, mask)
    for slot, name in enumerate(reference._names):
        assert getattr(reference, f"index_{slot}") is mask.selected_indices(name, "cpu")
    assert reference.extra_bytes() - reference.value_bytes() == 4 * mask.num_selected
    assert restriction.held_bytes == 4 * mask.num_selected
    restriction.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_swap_equals_the_torch_swap(dtype, monkeypatch):
    """The packed-bit numba swap and the positions + scratch-buffer torch swap (other devices) exchange the same
    bits, also when the reference was bound on the packed path and swaps through positions later."""
    from sparse_rl.restrict import bitscan

    results = []
    for in_place in (True, False):
        policy = make_tiny_model().to(dtype)
        mask = random_mask(policy, 0.3, seed=2)
        reference = SharedReference(policy, mask)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(1.0)  # the "trained" values differ from the stored ones everywhere
        trained = {n: p.detach().clone() for n, p in policy.named_parameters()}
        if not in_place:
            monkeypatch.setattr(bitscan, "walks", lambda param: False)
        with reference.swapped():
            results.append({n: p.detach().clone() for n, p in policy.named_parameters()})
        for name, param in policy.named_parameters():
            assert torch.equal(param.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               trained[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
        monkeypatch.undo()
    base = make_tiny_model().to(dtype)
    for name, param in base.named_parameters():
        assert torch.equal(results[0][name], results[1][name]), name
        selected = mask[name] if name in mask else torch.zeros_like(param, dtype=torch.bool)
        assert torch.equal(results[0][name][selected], param.detach()[selected]), f"{name}: not the starting values"
        assert torch.equal(results[0][name][~selected], param.detach()[~selected] + 1.0), f"{name}: unselected moved"


def test_policy_restored_when_reference_forward_raises():
    policy, _, _, reference = _trained_policy(0.3)
    snapshot = _snapshot(policy)
    policy.train()
    with pytest.raises(IndexError):
        reference(input_ids=torch.full((1, 4), VOCAB + 5))  # token id outside the embedding table
    _assert_unchanged(policy, snapshot)
    assert all(m.training for m in policy.modules()), "training flags were not restored"
    reference(input_ids=_inputs())  # not stuck in the swapped state


def test_reference_forward_between_policy_forward_and_backward_keeps_gradients():
    """DPO/KTO order: policy forward (saves weights for backward), reference forward, then backward."""
    policy, _, _, reference = _trained_policy(0.3)
    twin = copy.deepcopy(policy)
    ids = _inputs()

    policy(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    loss = policy(input_ids=ids, labels=ids).loss
    reference(input_ids=ids)
    loss.backward()  # a version bump on a saved weight would raise here; wrong values would change the gradients
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=0, msg=name)

    # why the swap goes through .data: the same swap done on the parameter itself breaks the policy's backward
    loss = twin(input_ids=ids, labels=ids).loss
    weight = twin.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.view(-1)[0] = weight.view(-1)[0].clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autocast_cache_does_not_leak_trained_weights():
    """Inside one autocast region the policy's forward caches bf16 copies of its (trained) weights."""
    policy, base, _, reference = _trained_policy(0.5)
    ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_logits = base(input_ids=ids).logits
    torch.clear_autocast_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        policy_logits = policy(input_ids=ids, labels=ids).logits  # with grad: fills the autocast cache
        reference_logits = reference(input_ids=ids).logits
    assert not torch.allclose(policy_logits.float(), base_logits.float())
    torch.testing.assert_close(reference_logits, base_logits, rtol=0, atol=0)


def test_reference_runs_in_eval_mode_like_a_frozen_copy():
    policy = make_tiny_model(attention_dropout=0.5)
    base = copy.deepcopy(policy).eval()
    mask = random_mask(policy, 0.2)
    reference = SharedReference(policy, mask)
    policy.train()
    policy.model.layers[1].eval()  # mixed flags must come back as they were
    flags = [m.training for m in policy.modules()]
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    assert [m.training for m in policy.modules()] == flags


def test_nested_swap_refused():
    policy = make_tiny_model()
    reference = SharedReference(policy, random_mask(policy, 0.1))
    with reference.swapped(), pytest.raises(RuntimeError, match="already swapped"):
        with reference.swapped():
            pass


# ---------------------------------------------------------------------------------------------- TRL trainers
def _make_trainer(kind, checkpoint, tmp_path, ref_model=None, **overrides):
    """A 3-step trainer of ``kind`` with a reference model (beta 0.5 for DPO/KTO, 0.2 for GRPO/RLOO by default)."""
    overrides = {"max_steps": 3, "learning_rate": 5e-2, "beta": 0.5 if kind in ("dpo", "kto") else 0.2, **overrides}
    return build_trainer(kind, checkpoint, tmp_path / f"out-{kind}", **overrides,
                         trainer_kwargs={"ref_model": ref_model} if ref_model is not None else None)


def _run(trainer, shared):
    copy_ref = trainer.ref_model
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=shared))
    if shared:
        reference = trainer.ref_model
        assert isinstance(reference, SharedReference) and reference.mask is sparse.mask
        assert all(m is not copy_ref for m in trainer.accelerator._models), "the reference copy was not released"
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind,metric", [("dpo", "rewards/margins"), ("kto", "kl"), ("grpo", "kl"), ("rloo", "kl")])
def test_trainer_with_shared_reference_matches_true_copy(kind, metric, tiny_checkpoint, tmp_path):
    with_copy = _run(_make_trainer(kind, tiny_checkpoint, tmp_path), shared=False)
    with_shared = _run(_make_trainer(kind, tiny_checkpoint, tmp_path), shared=True)
    assert len(with_copy) == len(with_shared) == 3
    for step, (a, b) in enumerate(zip(with_copy, with_shared)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), f"step {step}"
        assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-6), f"{metric} at step {step}"
    # the reference must matter: after the first update the policy has left it
    assert any(abs(e[metric]) > 1e-4 for e in with_copy[1:]), f"{metric} never moved; the comparison is vacuous"
    if kind == "dpo":
        assert with_copy[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_shared_reference_passed_at_construction(kind, tiny_checkpoint, tmp_path):
    """DPO and KTO take ref_model=: no copy is ever loaded when the mask is known before the trainer."""
    expected = _run(_make_trainer(kind, tiny_checkpoint, tmp_path), shared=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    mask = random_mask(model, 0.2)
    reference = SharedReference(model, mask)
    trainer = _make_trainer(kind, tiny_checkpoint, tmp_path / "at-construction", reference, model=model)
    sparsify(trainer, SparseConfig(mask=mask, shared_reference=True))
    assert trainer.ref_model is reference
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in expected], rel=1e-6, abs=1e-7)


def test_refuses_reference_that_is_not_the_policy(tiny_checkpoint, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint(tmp_path / "other", seed=1))
    trainer = _make_trainer("dpo", tiny_checkpoint, tmp_path, ref_model=other)
    with pytest.raises(ValueError, match="differs from the policy"):
        sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=True))
    _assert_untouched(trainer, other)


@pytest.mark.parametrize("overrides,match", [
    ({"sync_ref_model": True}, "sync_ref_model"),
    ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
])
def test_refuses_unsupported_dpo_setups(overrides, match, tiny_checkpoint, tmp_path):
    trainer = _make_trainer("dpo", tiny_checkpoint, tmp_path, **overrides)
    reference = trainer.ref_model
    with pytest.raises(ValueError, match=match):
        sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=True))
    _assert_untouched(trainer, reference)


def test_refuses_trainer_without_reference(tiny_checkpoint, tmp_path):
    trainer = _make_trainer("grpo", tiny_checkpoint, tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="keeps no reference model"):
        sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=True))
    _assert_untouched(trainer, None)


@pytest.mark.parametrize("shared_reference", [False, True])
def test_refuses_mask_that_misses_trained_entries(shared_reference, tiny_checkpoint, tmp_path):
    """A SharedReference passed as ref_model= must store the starting value of every entry sparsify trains."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    reference = SharedReference(model, random_mask(model, 0.2, seed=1))
    trainer = _make_trainer("dpo", tiny_checkpoint, tmp_path, reference, model=model)
    with pytest.raises(ValueError, match="outside its SharedReference's mask"):
        sparsify(trainer, SparseConfig(mask=random_mask(model, 0.2, seed=0), shared_reference=shared_reference))
    _assert_untouched(trainer, reference)


def _assert_untouched(trainer, reference):
    """A refused sparsify changed nothing: no parameter frozen, no optimizer factory, the same reference."""
    assert getattr(trainer, "sparse_training", None) is None
    assert trainer.optimizer_cls_and_kwargs is None
    assert trainer.ref_model is reference
    assert all(p.requires_grad for p in trainer.model.parameters())
