"""Mask discovery: checkpoint diffs (in memory, single-file, sharded, tied), baselines and budget rules."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sparse_rl.discovery import (
    WeightSource,
    diff_mask,
    magnitude_mask,
    mask_from_scores,
    random_mask,
)
from sparse_rl.mask import SubnetworkMask
from tests.tiny import make_bf16_one_step_pair, make_tiny_model


def _perturb(model, share=0.05, size=1e-3, seed=1):
    """Change a known random subset of every tensor by ±size; also nudge others below the 1e-5 tolerance."""
    generator = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            order = torch.randperm(flat.numel(), generator=generator)
            chosen = order[: max(1, int(share * flat.numel()))]
            nudged = order[-max(1, int(share * flat.numel())):]  # disjoint from chosen for these sizes
            flat[chosen] += size * torch.where(torch.rand(chosen.numel(), generator=generator) < 0.5, -1.0, 1.0)
            flat[nudged] += 1e-7  # below tolerance: must not count as changed
            selection = torch.zeros(flat.numel(), dtype=torch.bool)
            selection[chosen] = True
            planted[name] = selection.view(param.shape)
    return SubnetworkMask(planted)


@pytest.fixture
def base_and_finetuned():
    base = make_tiny_model(seed=0)
    finetuned = make_tiny_model(seed=0)
    planted = _perturb(finetuned)
    return base, finetuned, planted


def test_diff_of_models_is_exactly_the_changed_entries(base_and_finetuned):
    base, finetuned, planted = base_and_finetuned
    assert diff_mask(base, finetuned) == planted


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_diff_of_checkpoints_single_and_sharded(tmp_path, base_and_finetuned, shard):
    base, finetuned, planted = base_and_finetuned
    base.save_pretrained(tmp_path / "base")
    kwargs = {"max_shard_size": shard} if shard else {}
    finetuned.save_pretrained(tmp_path / "ft", **kwargs)
    if shard:
        index = json.loads((tmp_path / "ft" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert diff_mask(tmp_path / "base", tmp_path / "ft") == planted
    # a folder against an in-memory model, and a bare .safetensors file, give the same mask
    assert diff_mask(base, tmp_path / "ft") == planted
    assert diff_mask(tmp_path / "base" / "model.safetensors", finetuned) == planted


def test_diff_of_bf16_checkpoints(tmp_path):
    base = make_tiny_model(seed=0).to(torch.bfloat16)
    finetuned = make_tiny_model(seed=0).to(torch.bfloat16)
    planted = _perturb(finetuned, size=0.05)  # 1e-7 nudges vanish in bf16, 0.05 does not
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    assert WeightSource(tmp_path / "ft").dtype("model.norm.weight") == torch.bfloat16
    expected = {n: (p.float() - b.float()).abs() > 1e-5
                for (n, p), b in zip(finetuned.named_parameters(), base.parameters())}
    mask = diff_mask(tmp_path / "base", tmp_path / "ft")
    assert mask == SubnetworkMask(expected)
    assert mask.intersection(planted).num_selected > 0.95 * planted.num_selected


def test_diff_with_density_keeps_largest_changes(base_and_finetuned):
    base, finetuned, _ = base_and_finetuned
    mask = diff_mask(base, finetuned, density=0.02)
    for (name, after), before in zip(finetuned.named_parameters(), base.parameters()):
        delta = (after - before).detach().abs().reshape(-1)
        k = -(-delta.numel() * 2 // 100)
        selected = mask[name].reshape(-1)
        assert int(selected.sum()) == k, name
        assert delta[selected].min() >= delta[~selected].max(), name


def test_diff_with_density_warns_when_fewer_entries_changed_than_asked(base_and_finetuned):
    base, finetuned, planted = base_and_finetuned  # 5% of every tensor changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diff_mask(base, finetuned, density=0.02)  # enough changed entries everywhere: no warning
    tensors = len(list(finetuned.parameters()))
    with pytest.warns(UserWarning, match=f"in {tensors} of {tensors} tensors .* ties .* by lowest index"):
        mask = diff_mask(base, finetuned, density=0.1)
    assert mask.intersection(planted) == planted  # the changed entries are all in, the fill comes on top
    with pytest.warns(UserWarning, match="changed overall"):
        diff_mask(base, finetuned, density=0.1, budget="global")


def _bf16_changed_near_and_far(density: float, seed: int = 0):
    """A base model with bf16-representable weights and a finetuned copy whose moves (away from zero, so rounding
    goes by the spacing above |w|) are, in each tensor: ~3% by 8 half-spacings (changed in bf16), then up to the
    ``density`` count by 0.6-0.9 half-spacings (unchanged, nearest to changing), the rest by 0-0.4 (unchanged).
    Returns (base, finetuned, changed selections, selections of changed + near)."""
    from sparse_rl.discovery import half_ulp, selected_count

    generator = torch.Generator().manual_seed(seed)
    base, finetuned = make_tiny_model(seed=0), make_tiny_model(seed=0)
    changed, top = {}, {}
    with torch.no_grad():
        for (name, before), after in zip(base.named_parameters(), finetuned.parameters()):
            before.copy_(torch.where(before == 0, 0.01, before).to(torch.bfloat16).float())  # no zero (padding row)
            n, order = before.numel(), torch.randperm(before.numel(), generator=generator)
            count, k = n // 33, selected_count(n, density)
            share = 0.4 * torch.rand(n, generator=generator)
            share[order[count:k]] = 0.6 + 0.3 * torch.rand(k - count, generator=generator)
            share[order[:count]] = 8.0
            move = (share.view(before.shape) * half_ulp(before)).copysign(before)
            after.copy_(before + move)
            changed[name], top[name] = (torch.zeros(n, dtype=torch.bool).index_fill(0, order[:m], True).view(
                before.shape) for m in (count, k))
    return base, finetuned, changed, top


def test_bf16_diff_fills_the_density_with_the_entries_nearest_to_changing():
    """Above the changed share, the default fill takes the unchanged entries that moved most before rounding (in
    half bf16 spacings); ``fill="rounded"`` keeps the lowest-index block of unchanged entries instead."""
    base, finetuned, changed, top = _bf16_changed_near_and_far(0.2)
    with pytest.warns(UserWarning, match="those that moved most before rounding first"):
        moved = diff_mask(base, finetuned, density=0.2, compare_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="ties .* by lowest index"):
        rounded = diff_mask(base, finetuned, density=0.2, compare_dtype=torch.bfloat16, fill="rounded")
    assert moved == SubnetworkMask(top)
    assert diff_mask(base, finetuned, tolerance=0.0, compare_dtype=torch.bfloat16) == SubnetworkMask(changed)
    for name, chosen in changed.items():
        flat, filled = chosen.reshape(-1), rounded[name].reshape(-1) & ~chosen.reshape(-1)
        assert rounded[name][chosen].all(), name
        first_unchanged = (~flat).nonzero().reshape(-1)[: int(filled.sum())]
        assert filled.nonzero().reshape(-1).tolist() == first_unchanged.tolist(), name  # the lowest-index block
    assert moved != rounded
    # below the changed share, or without rounding, the fill never comes into play: both fills agree
    with warnings.catch_warnings():  # the MLP matrices changed 3% each, above 1%
        warnings.simplefilter("error")
        assert diff_mask(base, finetuned, density=0.01, compare_dtype=torch.bfloat16, include=("mlp",)) == diff_mask(
            base, finetuned, density=0.01, compare_dtype=torch.bfloat16, include=("mlp",), fill="rounded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert diff_mask(base, finetuned, density=0.2) == diff_mask(base, finetuned, density=0.2, fill="rounded")
    with pytest.raises(ValueError, match="fill must be one of"):
        diff_mask(base, finetuned, density=0.2, compare_dtype=torch.bfloat16, fill="index")


def test_a_checkpoint_stored_in_the_compare_dtype_fills_by_index_and_says_so(tmp_path):
    """A bf16 checkpoint holds no move before rounding (its difference to an fp32 base would be the base's own
    rounding error): the fill falls back to lowest index, and the warning names why."""
    base, finetuned, _, _ = _bf16_changed_near_and_far(0.2)
    finetuned.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with pytest.warns(UserWarning, match=r"21 of these tensors .* stored no finer than the compare dtype"):
        stored = diff_mask(base, tmp_path / "bf16", density=0.2, compare_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="by lowest index"):
        assert stored == diff_mask(base, finetuned, density=0.2, compare_dtype=torch.bfloat16, fill="rounded")


def test_below_the_changed_share_the_changed_entries_rank_by_their_move_before_rounding():
    """Every changed entry moved one bf16 spacing after rounding, so the rounded |Δ| ties throughout: the default
    keeps those that moved most before rounding, ``rank_changed="rounded"`` the lowest-index changed entries."""
    from sparse_rl.discovery import selected_count

    base, finetuned, moves = make_bf16_one_step_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20% changed everywhere: no fill at 5%
        moved = diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16)
        rounded = diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16, rank_changed="rounded")
        pooled = diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16, budget="global")
    changed = diff_mask(base, finetuned, compare_dtype=torch.bfloat16)
    for name, move in moves.items():
        k = selected_count(move.numel(), 0.05)
        flat = move.reshape(-1)
        assert moved[name].reshape(-1).nonzero().reshape(-1).tolist() == sorted(flat.topk(k).indices.tolist()), name
        first_changed = changed[name].reshape(-1).nonzero().reshape(-1)[:k]
        assert rounded[name].reshape(-1).nonzero().reshape(-1).tolist() == first_changed.tolist(), name
    every = torch.cat([m.reshape(-1) for m in moves.values()])  # the global budget pools the unrounded moves
    k = selected_count(every.numel(), 0.05)
    assert torch.cat([pooled[n].reshape(-1) for n in moves]).nonzero().reshape(-1).tolist() == sorted(
        every.topk(k).indices.tolist())
    # the fill rule does not change which changed entries rank first; above the changed share all changed are in
    assert diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16, fill="rounded") == moved
    with pytest.warns(UserWarning, match="fills the rest"):
        assert diff_mask(base, finetuned, density=0.3, compare_dtype=torch.bfloat16).intersection(changed) == changed
    with pytest.raises(ValueError, match="rank_changed must be one of"):
        diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16, rank_changed="index")


def test_a_checkpoint_stored_in_the_compare_dtype_ranks_its_changed_entries_by_index_and_says_so(tmp_path):
    base, finetuned, _ = make_bf16_one_step_pair()
    finetuned.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with pytest.warns(UserWarning, match=r"tensors .* changed more entries than density=0.05 keeps .* ties by lowest"):
        stored = diff_mask(base, tmp_path / "bf16", density=0.05, compare_dtype=torch.bfloat16)
    assert stored == diff_mask(base, finetuned, density=0.05, compare_dtype=torch.bfloat16, rank_changed="rounded")


def test_tied_embeddings_counted_once(tmp_path):
    base = make_tiny_model(seed=0, tie_word_embeddings=True)
    finetuned = make_tiny_model(seed=0, tie_word_embeddings=True)
    with torch.no_grad():
        finetuned.lm_head.weight[3, :5] += 0.1  # the same storage as embed_tokens
    mask = diff_mask(base, finetuned)
    assert "lm_head.weight" not in mask and int(mask["model.embed_tokens.weight"].sum()) == 5
    # a checkpoint that still stores both keys of a tied model
    finetuned.save_pretrained(tmp_path / "ft")
    state = {n: p.detach().clone() for n, p in finetuned.named_parameters()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "ft" / "model.safetensors"))
    assert "lm_head.weight" not in WeightSource(tmp_path / "ft").names
    assert diff_mask(base, tmp_path / "ft") == mask
    # a pattern naming the tied alias selects the embedding it shares storage with
    only_head = random_mask(finetuned, 0.5, include=("lm_head",))
    assert list(only_head) == ["model.embed_tokens.weight"]


def test_include_exclude_patterns(tiny_model):
    mask = random_mask(tiny_model, 0.1, exclude=("embed_tokens", "lm_head", "norm"))
    assert mask and not any(("embed" in n) or ("lm_head" in n) or ("norm" in n) for n in mask)
    only_mlp = magnitude_mask(tiny_model, 0.1, include=("mlp",))
    assert only_mlp and all(".mlp." in n for n in only_mlp)
    with pytest.raises(ValueError, match="include pattern 'nonexistent' matches no parameter"):
        random_mask(tiny_model, 0.1, include=("nonexistent",))
    with pytest.raises(ValueError, match="no parameter left"):
        random_mask(tiny_model, 0.1, exclude=("model", "lm_head"))


def test_an_exclude_pattern_that_matches_nothing_is_a_typo(tiny_model, tiny_checkpoint, tmp_path):
    from sparse_rl import SparseConfig, sparsify
    from tests.trl_cases import build_trainer

    with pytest.raises(ValueError, match="exclude pattern 'embed_token_s' matches no parameter"):
        random_mask(tiny_model, 0.1, exclude=("embed_token_s",))
    tiny_model.model.embed_tokens.weight.requires_grad_(False)  # excluding a frozen tensor is no typo
    assert "model.embed_tokens.weight" not in random_mask(tiny_model, 0.1, exclude=("embed_tokens",))
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path / "out")
    with pytest.raises(ValueError, match="exclude pattern 'embed_token_s'"):
        sparsify(trainer, SparseConfig(discovery="random", exclude=("embed_token_s",)))


@pytest.mark.parametrize("largest", [True, False])
def test_magnitude_mask(tiny_model, largest):
    mask = magnitude_mask(tiny_model, 0.25, largest=largest)
    for name, param in tiny_model.named_parameters():
        magnitude = param.detach().abs().reshape(-1)
        selected = mask[name].reshape(-1)
        assert int(selected.sum()) == -(-magnitude.numel() // 4)
        if largest:
            assert magnitude[selected].min() >= magnitude[~selected].max()
        else:
            assert magnitude[selected].max() <= magnitude[~selected].min()


def test_global_budget_takes_exact_top_k_over_all_tensors():
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(100, generator=generator) * 10, "b": torch.rand(3, 7, generator=generator),
              "c": torch.zeros(50)}  # ties at zero
    mask = mask_from_scores(scores, 0.3, budget="global")
    pooled = torch.cat([s.reshape(-1) for s in scores.values()])
    k = -(-pooled.numel() * 3 // 10)
    assert mask.num_selected == k
    selected = torch.cat([mask[n].reshape(-1) for n in scores])
    assert pooled[selected].min() >= pooled[~selected].max()
    # the large-score tensor takes most of the budget, unlike the per-tensor rule
    assert int(mask["a"].sum()) > int(mask_from_scores(scores, 0.3)["a"].sum())
    # ties at the threshold are filled to exactly k
    assert mask_from_scores(scores, 0.9, budget="global").num_selected == -(-pooled.numel() * 9 // 10)


def test_random_mask_global_budget(tiny_model):
    mask = random_mask(tiny_model, 0.2, budget="global")
    total = sum(p.numel() for p in tiny_model.parameters())
    assert mask.num_selected == -(-total * 2 // 10)


def test_bad_inputs(tmp_path, base_and_finetuned, tiny_model):
    base, finetuned, _ = base_and_finetuned
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            diff_mask(base, finetuned, density=density)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            magnitude_mask(tiny_model, density)
    with pytest.raises(ValueError, match="budget must be one of"):
        mask_from_scores({"a": torch.ones(3)}, 0.5, budget="layerwise")
    with pytest.raises(ValueError, match="'a' contain NaN"):
        mask_from_scores({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        diff_mask(base, finetuned, tolerance=-1)
    wider = make_tiny_model(seed=0, intermediate_size=80)
    with pytest.raises(ValueError, match="mismatched architectures: 'model.layers.0.mlp.gate_proj.weight'"):
        diff_mask(base, wider)
    deeper = make_tiny_model(seed=0, num_hidden_layers=3)
    with pytest.raises(ValueError, match="tensor 'model.layers.2.*is missing from"):
        diff_mask(base, deeper)
    # a checkpoint with a tensor removed
    state = {n: p.detach().clone() for n, p in finetuned.named_parameters() if n != "model.norm.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight'.*is missing from .*partial.safetensors"):
        diff_mask(base, tmp_path / "partial.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        diff_mask(base, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        diff_mask(base, tmp_path / "missing")


def test_random_mask_per_tensor_equals_selecting_from_all_scores(tiny_model):
    """random_mask selects each tensor as its scores are drawn; the mask is the one mask_from_scores gives from the
    same scores drawn all at once."""
    from sparse_rl.discovery.strategies import mask_from_scores, trainable_parameters

    generator = torch.Generator().manual_seed(3)
    scores = {name: torch.rand(param.shape, generator=generator) for name, param in trainable_parameters(tiny_model)}
    assert random_mask(tiny_model, 0.15, seed=3) == mask_from_scores(scores, 0.15)
