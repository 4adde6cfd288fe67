import torch

from sparse_rl import SubnetworkMask
from sparse_rl.discovery import random_mask
from sparse_rl.restrict import restrict_gradients


def test_gradients_zero_outside_mask_and_untouched_inside(tiny_model):
    ids = torch.randint(0, 20, (2, 6))
    dense = {n: None for n, _ in tiny_model.named_parameters()}
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    for n, p in tiny_model.named_parameters():
        dense[n] = p.grad.clone()
        p.grad = None

    mask = random_mask(tiny_model, 0.2)
    restrict_gradients(tiny_model, mask)
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p.grad[~mask[n]], torch.zeros_like(p.grad[~mask[n]])), n
        assert torch.equal(p.grad[mask[n]], dense[n][mask[n]]), n


def test_clipping_sees_masked_gradient(tiny_model):
    """grad-norm (as logged and clipped by Trainer) must be the norm of the masked gradient."""
    ids = torch.randint(0, 20, (2, 6))
    mask = random_mask(tiny_model, 0.05)
    restrict_gradients(tiny_model, mask)
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(tiny_model.parameters(), max_norm=1e9)
    expected = torch.linalg.vector_norm(torch.cat([p.grad[mask[n]] for n, p in tiny_model.named_parameters()]))
    assert torch.allclose(norm, expected)


def test_empty_and_missing_selections_freeze(tiny_model):
    names = [n for n, _ in tiny_model.named_parameters()]
    selections = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in tiny_model.named_parameters()}
    selections[names[1]][0, 0] = True
    del selections[names[2]]
    restriction = restrict_gradients(tiny_model, SubnetworkMask(selections))
    params = dict(tiny_model.named_parameters())
    assert params[names[1]].requires_grad
    assert not params[names[0]].requires_grad and not params[names[2]].requires_grad
    restriction.remove()
    assert all(p.requires_grad for p in tiny_model.parameters())
