"""The chunked exact top-k selection against a plain stable-sort reference and against ``torch.topk``."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sparse_rl.discovery import random_mask, select
from sparse_rl.discovery.select import kth_largest_key, top_k_selections
from tests.tiny import make_tiny_model


def _reference(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Stable descending sort of all scores pooled (flat order breaks ties), first k taken."""
    pooled = torch.cat([s.reshape(-1).float() for s in scores])
    pooled = torch.where(pooled == 0, torch.zeros_like(pooled), pooled)  # -0.0 == 0.0
    order = torch.sort(pooled, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(pooled.numel(), dtype=torch.bool)
    chosen[order] = True
    return list(chosen.split([s.numel() for s in scores]))


values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 1e-30, -1e-30, 3.0e38, -3.0e38, 7.0])
tensors = st.lists(st.lists(st.one_of(values, st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=40),
                   min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(tensors, st.floats(0.0, 1.0))
def test_selection_matches_a_stable_sort_with_ties_to_the_lowest_index(data, share):
    scores = [torch.tensor(row, dtype=torch.float32) for row in data]
    k = max(1, math.ceil(share * sum(s.numel() for s in scores)))
    ours = top_k_selections(scores, k)
    for got, want in zip(ours, _reference(scores, k)):
        assert torch.equal(got.reshape(-1), want)
    assert sum(int(s.sum()) for s in ours) == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_without_ties_the_set_is_topk_s_over_several_chunks(monkeypatch, dtype):
    monkeypatch.setattr(select, "CHUNK", 1000)  # several chunks per tensor, a partial last one
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bfloat16:  # 200 values distinct in bf16
        scores = torch.linspace(-3, 3, 200).to(dtype)[torch.randperm(200, generator=generator)]
    else:
        scores = (torch.randperm(12_345, generator=generator).to(dtype) - 6000) / 7
    assert scores.unique().numel() == scores.numel()
    for k in (1, 7, scores.numel() // 10, scores.numel() - 1, scores.numel()):
        got = top_k_selections([scores.reshape(-1, 5) if scores.numel() % 5 == 0 else scores], k)[0].reshape(-1)
        want = torch.zeros(scores.numel(), dtype=torch.bool)
        want[torch.topk(scores.float(), k).indices] = True
        assert torch.equal(got, want)


def test_threshold_key_orders_like_the_floats(monkeypatch):
    monkeypatch.setattr(select, "CHUNK", 7)
    scores = torch.tensor([-3.0, -0.0, 0.0, 2.0, -1e-38, 1e-38, float("-3e38"), 5.0])
    ordered = sorted(scores.tolist(), reverse=True)
    for k in range(1, scores.numel() + 1):
        key = kth_largest_key([scores[:4], scores[4:]], k)
        value = torch.tensor([key], dtype=torch.int32)
        value = (value ^ ((value >> 31) & 0x7FFFFFFF)).view(torch.float32).item()
        assert value == ordered[k - 1]  # -0.0 and 0.0 compare equal


def test_ties_and_refusals():
    scores = torch.zeros(10)
    assert torch.equal(top_k_selections([scores], 3)[0], torch.arange(10) < 3)
    # global: ties go to the earlier tensor first
    a, b = top_k_selections([torch.ones(4), torch.ones(4)], 6)
    assert bool(a.all()) and torch.equal(b, torch.tensor([True, True, False, False]))
    for k in (0, 11):
        with pytest.raises(ValueError, match="k="):
            top_k_selections([scores], k)


def test_random_mask_keeps_its_counts_and_draws_uniformly():
    model = make_tiny_model()
    mask = random_mask(model, 0.1, seed=0)
    for name, param in model.named_parameters():
        if name in mask:
            assert mask.count(name) == math.ceil(0.1 * param.numel())
    assert random_mask(model, 0.1, seed=0) == mask and random_mask(model, 0.1, seed=1) != mask


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=4), st.floats(1e-6, 1.0))
def test_selected_count_is_what_each_budget_selects(sizes, density):
    """The count other code plans with (LoRA's matched rank, diff_mask's fill warning) is the count selected."""
    from sparse_rl.discovery import mask_from_scores, selected_count

    scores = {f"t{i}": torch.rand(n) for i, n in enumerate(sizes)}
    assert [selected_count(n, density) for n in sizes] == [max(1, math.ceil(density * n)) for n in sizes]
    per_tensor = mask_from_scores(scores, density)
    assert [per_tensor.count(name) for name in scores] == [selected_count(n, density) for n in sizes]
    assert mask_from_scores(scores, density, "global").num_selected == selected_count(sum(sizes), density)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.floats(0.0, 1.0)), min_size=1, max_size=4), st.floats(1e-6, 1.0))
def test_budget_shortfall_is_what_a_top_k_over_the_changed_entries_fills(tensors, density):
    """The per-tensor top-k over scores that rank every changed entry first selects exactly ``budget_shortfall``
    unchanged ones per tensor (diff_mask's fill warning and the post-hoc fill scripts count with it)."""
    from sparse_rl.discovery import budget_shortfall, mask_from_scores

    changed = {f"t{i}": torch.rand(n) < share for i, (n, share) in enumerate(tensors)}
    scores = {name: c.float() + torch.rand(c.shape) for name, c in changed.items()}  # changed: (1, 2), others: (0, 1)
    mask = mask_from_scores(scores, density)
    filled = {name: int((mask.selections[name] & ~c).sum()) for name, c in changed.items()}
    assert budget_shortfall(changed, density) == filled


def test_magnitude_mask_streams_per_tensor_and_refuses_nan():
    from sparse_rl.discovery import magnitude_mask, mask_from_scores

    model = make_tiny_model()
    scores = {name: p.detach().abs() for name, p in model.named_parameters()}
    assert magnitude_mask(model, 0.2) == mask_from_scores(scores, 0.2)
    assert magnitude_mask(model, 0.2, largest=False) == mask_from_scores({n: -s for n, s in scores.items()}, 0.2)
    assert magnitude_mask(model, 0.2, budget="global") == mask_from_scores(scores, 0.2, "global")
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"weights of '{name}' contain NaN"):
        magnitude_mask(model, 0.2)
