"""The post-hoc overlap script cuts the same mask the choose-by runs train, and splits off its index-filled part."""

import copy
import sys
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
        reference = diff_mask(tiny_model, finetuned, density=0.1, compare_dtype=torch.bfloat16, fill="rounded")
    assert mask.digests() == reference.digests()
    assert changed_share == changed / mask.num_total
    for name, selection in moved.items():
        assert not (selection & ~mask.selections[name]).any()  # the moved part lies inside the mask
    assert 0 < moved.num_selected < mask.num_selected
