"""The post-hoc overlap script cuts the same mask the choose-by runs train, and splits off its index-filled part."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from choose_by_posthoc_overlap import posthoc_masks  # noqa: E402

from sparse_rl.discovery import diff_mask  # noqa: E402


def test_posthoc_masks_match_diff_mask_and_separate_the_entries_that_moved(tiny_model):
    finetuned = copy.deepcopy(tiny_model)
    changed = 0
    with torch.no_grad():
        for i, p in enumerate(finetuned.parameters()):
            if i % 2 == 0:  # half the tensors move 3% of their entries (below the 10% density: filled by index),
                share = 0.03
            else:  # the others 40% (above it: the mask keeps the largest 10%)
                share = 0.4
            moving = torch.rand(p.shape) < share
            p.add_(moving * (p.abs() + 1.0))  # big enough to survive bf16 rounding
            changed += int(moving.sum())
    mask, moved, changed_share, short = posthoc_masks(tiny_model, finetuned, 0.1)
    tensors = len(list(finetuned.parameters()))
    assert short == (tensors + 1) // 2
    with pytest.warns(UserWarning, match=f"in {short} of {short + tensors // 2} tensors"):  # the fill is announced
        reference = diff_mask(tiny_model, finetuned, density=0.1, compare_dtype=torch.bfloat16, fill="rounded",
                              rank_changed="rounded")
    assert mask.digests() == reference.digests()
    assert changed_share == changed / mask.num_total
    for name, selection in moved.items():
        assert not (selection & ~mask.selections[name]).any()  # the moved part lies inside the mask
    assert 0 < moved.num_selected < mask.num_selected


def test_fill_share_is_the_part_of_the_rounded_mask_that_did_not_change(tiny_model):
    """posthoc_fill_share.py counts the fill from per-tensor changed counts; the mask diff_mask cuts agrees."""
    from posthoc_fill_share import fill_shares

    finetuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for i, p in enumerate(finetuned.parameters()):
            moving = torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < (0.03 if i % 2 else 0.4)
            p.add_(moving * (p.abs() + 1.0))  # survives bf16 rounding
    changed_share, shares = fill_shares(tiny_model, finetuned, (0.01, 0.1, 0.5))
    changed = diff_mask(tiny_model, finetuned, compare_dtype=torch.bfloat16)
    assert changed_share == changed.num_selected / changed.num_total
    for density, (short, total, share) in shares.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mask = diff_mask(tiny_model, finetuned, density, compare_dtype=torch.bfloat16, fill="rounded")
        inside = sum(int((mask.selections[n] & c).sum()) for n, c in changed.selections.items())
        assert share == pytest.approx(1 - inside / mask.num_selected)
        assert total == len(mask.selections) and (short > 0) == (share > 0)
    assert shares[0.5][2] > shares[0.1][2] > 0  # more of the mask is fill the higher the density


def test_rank_ties_counts_the_changed_entries_a_rounded_rank_chose_by_index():
    """Every changed entry of the pair moved one bf16 spacing after rounding: below the changed share (20%) a mask
    ranked by the rounded |Δ| is all a tie cut by index, and the mask ranked by the move keeps part of it; above it
    every changed entry is in, so nothing is ranked and both masks agree."""
    from posthoc_fill_share import rank_ties

    from tests.tiny import make_bf16_one_step_pair

    base, finetuned, _ = make_bf16_one_step_pair()
    ties = rank_ties(base, finetuned, (0.05, 0.3))
    assert ties[0.05][0] == 1.0 and 0 < ties[0.05][1] < 1
    assert ties[0.3] == (0.0, 1.0)


def test_the_overlap_scripts_mask_is_the_one_the_10pct_post_hoc_runs_trained(tmp_path, tiny_checkpoint):
    """The overlap script describes the masks stage C/J/L trained (``RunConfig`` defaults: the lowest-index fill and
    the changed entries by their rounded |Δ|), not ``diff_mask``'s current defaults, which cut another mask here."""
    from choosing.runs import RunConfig, _sparse_config
    from safetensors.torch import load_file, save_file

    from sparse_rl.discovery import half_ulp

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)  # ~24% of entries move over half a bf16 spacing: above 10%
    final = {n: w + 3 * torch.rand(w.shape, generator=generator) ** 4 * half_ulp(w) for n, w in weights.items()}
    save_file(final, str(tmp_path / "final.safetensors"))
    trained = _sparse_config(RunConfig(method="sparse", mask="posthoc", density=0.1, learning_rate=3e-5), None,
                             tiny_checkpoint, tmp_path / "final.safetensors").mask
    assert posthoc_masks(tiny_checkpoint, tmp_path / "final.safetensors", 0.1)[0] == trained
    assert diff_mask(tiny_checkpoint, tmp_path / "final.safetensors", 0.1, compare_dtype=torch.bfloat16) != trained
