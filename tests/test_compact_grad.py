"""Compact gradients against the dense masked gradients they replace."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_rl import MaskedAdamW, random_mask, restrict_gradients
from sparse_rl.compact_grad import clip_grad_norm_, compact_grad_of


def _backward(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def _dense_and_compact(model, mask):
    dense, compact = model, copy.deepcopy(model)
    restrict_gradients(dense, mask)
    restrict_gradients(compact, mask, compact=True)
    return dense, compact


def test_holds_the_selected_entries_and_frees_the_dense_gradient(tiny_model):
    mask = random_mask(tiny_model, 0.2)
    dense, compact = _dense_and_compact(tiny_model, mask)
    ids = torch.randint(0, 20, (2, 6))
    for micro_batch in (ids[:, :5], ids[:, 1:], ids[:, 2:]):  # accumulation: later backwards add, as into .grad
        _backward(dense, micro_batch)
        _backward(compact, micro_batch)
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        if mask[name].all():
            assert compact_grad_of(p_compact) is None and torch.equal(p_compact.grad, p_dense.grad), name
            continue
        assert p_compact.grad is None, name
        assert torch.equal(compact_grad_of(p_compact), p_dense.grad[mask[name]]), name


def test_clipping_matches_torch_on_dense_masked_gradients(tiny_model):
    mask = random_mask(tiny_model, 0.1)
    dense, compact = _dense_and_compact(tiny_model, mask)
    ids = torch.randint(0, 20, (2, 6))
    _backward(dense, ids)
    _backward(compact, ids)
    expected = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm=1e-3)
    norm = clip_grad_norm_(compact.parameters(), max_norm=1e-3)
    torch.testing.assert_close(norm, expected)
    assert float(norm) > 1e-3  # the clip did scale
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        got = p_compact.grad if p_compact.grad is not None else compact_grad_of(p_compact)
        torch.testing.assert_close(got, p_dense.grad[mask[name]] if p_compact.grad is None else p_dense.grad)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_training_equals_dense_masked_gradients(tiny_model, state_bits):
    """Three steps of MaskedAdamW with two micro-batches each: the same parameters bit for bit, less gradient memory."""
    mask = random_mask(tiny_model, 0.1)
    dense, compact = _dense_and_compact(tiny_model, mask)
    optimizers = [MaskedAdamW(model.named_parameters(), mask, lr=1e-2, state_bits=state_bits, backend="cpu")
                  for model in (dense, compact)]
    ids = torch.randint(0, 20, (3, 2, 2, 6))
    for step in range(3):
        gradient_bytes = []
        for model, optimizer in zip((dense, compact), optimizers):
            for micro_batch in ids[step]:
                _backward(model, micro_batch)
            gradient_bytes.append(sum(g.numel() * g.element_size() for p in model.parameters()
                                      for g in (p.grad, compact_grad_of(p)) if g is not None))
            optimizer.step()
            optimizer.zero_grad()
        assert gradient_bytes[1] < 0.2 * gradient_bytes[0]
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        assert torch.equal(p_dense, p_compact), name
        assert compact_grad_of(p_compact) is None  # zero_grad dropped them


def test_remove_restores_dense_gradients(tiny_model):
    mask = random_mask(tiny_model, 0.2)
    restriction = restrict_gradients(tiny_model, mask, compact=True)
    restriction.remove()
    _backward(tiny_model, torch.randint(0, 20, (2, 6)))
    assert all(p.grad is not None and not hasattr(p, "compact_grad") for p in tiny_model.parameters())
