"""MaskedAdamW refuses what would silently step the wrong entries, and can skip steps with non-finite gradients."""

import pytest
import torch

from sparse_rl import MaskedAdamW, SparseConfig, SubnetworkMask, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.restrict.compact import register_compact_gradient
from sparse_rl.trl import MASK_FILE_NAME
from tests.trl_cases import build_trainer

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.nn.Parameter(torch.randn(16, 16, generator=g)),
            "b": torch.nn.Parameter(torch.randn(16, generator=g))}


def _mask(params, seed=1, density=0.25):
    g = torch.Generator().manual_seed(seed)
    return SubnetworkMask({n: torch.rand(p.shape, generator=g) < density for n, p in params.items()})


def _set_grads(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)


def test_a_parameter_made_non_contiguous_after_construction_is_refused_unchanged():
    params = _layer()
    optimizer = MaskedAdamW(params.items(), _mask(params), **HYPER)
    _set_grads(params)
    optimizer.step()
    params["w"].data = params["w"].data.t().contiguous().t()  # same values, column-major storage
    before = params["w"].detach().clone()
    _set_grads(params, seed=3)
    with pytest.raises(RuntimeError, match="'w' is no longer contiguous"):
        optimizer.step()
    assert torch.equal(params["w"], before)


def test_state_of_another_mask_with_equal_counts_is_refused():
    params = _layer()
    mask = _mask(params)
    permuted = SubnetworkMask({n: s.reshape(-1)[torch.randperm(s.numel())].reshape(s.shape) for n, s in mask.items()})
    assert all(int(mask[n].sum()) == int(permuted[n].sum()) for n in mask) and mask != permuted
    optimizer = MaskedAdamW(params.items(), mask, **HYPER)
    _set_grads(params)
    optimizer.step()
    saved = optimizer.state_dict()
    MaskedAdamW(_layer().items(), mask, **HYPER).load_state_dict(saved)  # the same mask loads
    other = MaskedAdamW(_layer().items(), permuted, **HYPER)
    with pytest.raises(ValueError, match="'w' was saved with a different mask"):
        other.load_state_dict(saved)
    assert not other.state, "state was loaded before the check"


def test_resume_refuses_optimizer_state_whose_mask_file_was_replaced(tiny_checkpoint, tmp_path):
    first = build_trainer("sft", tiny_checkpoint, tmp_path / "first", max_steps=1, save_strategy="steps", save_steps=1)
    mask = random_mask(first.model, 0.1, seed=3)
    sparsify(first, SparseConfig(mask=mask))
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-1"
    g = torch.Generator().manual_seed(5)  # the same count in every tensor, other entries
    replaced = SubnetworkMask({n: s.reshape(-1)[torch.randperm(s.numel(), generator=g)].reshape(s.shape)
                               for n, s in mask.items()})
    replaced.save(checkpoint / MASK_FILE_NAME)
    second = build_trainer("sft", tiny_checkpoint, tmp_path / "second", max_steps=2)
    sparsify(second, SparseConfig(mask=str(checkpoint / MASK_FILE_NAME)))
    with pytest.raises(ValueError, match="was saved with a different mask"):
        second.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
def test_skip_nonfinite_leaves_weights_and_state_and_then_steps_as_if_it_never_happened(compact):
    params, reference = _layer(), _layer()
    mask = _mask(params)
    skipping = MaskedAdamW(params.items(), mask, skip_nonfinite=True, **HYPER)
    plain = MaskedAdamW(reference.items(), mask, **HYPER)
    handles = [register_compact_gradient(p, mask[n]) for n, p in params.items()] if compact else []

    def backward(tensors, seed, poison=False):
        g = torch.Generator().manual_seed(seed)
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in tensors.values())
        if poison:
            loss = loss * float("nan")
        loss.backward()

    backward(params, 0)
    skipping.step()
    skipping.zero_grad()
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = {n: {k: v.clone() for k, v in skipping.state[p].items()} for n, p in params.items()}
    backward(params, 1, poison=True)
    skipping.step()
    skipping.zero_grad()
    assert skipping.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    for n, p in params.items():
        assert all(torch.equal(v, state_before[n][k]) for k, v in skipping.state[p].items()), n
    backward(params, 2)
    skipping.step()
    for seed in (0, 2):  # the reference never saw the poisoned step
        backward(reference, seed)
        plain.step()
        plain.zero_grad()
    for n in params:
        assert torch.equal(params[n], reference[n]), n
    for handle in handles:
        handle.remove()


def test_without_skipping_a_nan_gradient_reaches_only_selected_entries():
    params = _layer()
    mask = _mask(params)
    optimizer = MaskedAdamW(params.items(), mask, **HYPER)
    before = {n: p.detach().clone() for n, p in params.items()}
    _set_grads(params)
    params["w"].grad[mask["w"]] = float("nan")
    optimizer.step()
    assert params["w"][mask["w"]].isnan().all()
    assert torch.equal(params["w"][~mask["w"]], before["w"][~mask["w"]])
