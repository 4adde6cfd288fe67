"""How much of a post-hoc mask is fill or a tie-break: the share of a ``diff_mask(..., density, compare_dtype=bf16)``
mask that bf16 rounding left unchanged, and below the changed share how the changed entries' rank decides it, at
several densities, for one full run's final weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/posthoc_fill_share.py WEIGHTS.safetensors \
        [--densities 0.01 0.05 0.1 0.3] [--out benchmarks/results/posthoc_fill_share.md]

Where a tensor changed fewer entries than the density asks for, the rest of its budget is fill (``diff_mask``'s
``fill``: the lowest-index block with ``"rounded"``, the entries nearest to changing with ``"moved"``). One pass over
the diff counts each tensor's changed entries (|delta| > the tolerance after rounding both sides to bf16, as the mask
itself counts them); the fill at every density follows from the counts.

Where a tensor changed more entries than the density keeps, ``rank_changed="rounded"`` ranks them by the rounded |Δ|,
mostly one bf16 spacing at the weight, so they tie and go by lowest index; the second table counts the mask entries
chosen that way (tied at the threshold, more tied entries than kept) and how much of the mask
``rank_changed="moved"`` (by the move before rounding, the default) keeps the same.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import choose_by  # noqa: E402
from _common import write_result  # noqa: E402

from sparse_rl.discovery import budget_shortfall, diff_mask, iter_deltas, selected_count  # noqa: E402

TOLERANCE = 1e-5  # what counts as changed after rounding (diff_mask's default); passed to every diff here


def fill_shares(base, finetuned, densities) -> tuple[float, dict[float, tuple[int, int, float]]]:
    """The share of all entries that changed in bf16, and per density (tensors short of it, tensors, share of the
    mask that is fill)."""
    changed = diff_mask(base, finetuned, tolerance=TOLERANCE, compare_dtype=torch.bfloat16)
    shares = {}
    for density in densities:
        short = budget_shortfall(changed.selections, density)
        budget = sum(selected_count(s.numel(), density) for s in changed.selections.values())
        shares[density] = (sum(map(bool, short.values())), len(short), sum(short.values()) / budget)
    return changed.num_selected / changed.num_total, shares


def rank_ties(base, finetuned, densities) -> dict[float, tuple[float, float]]:
    """Per density (moved fill): (share of the ``rank_changed="rounded"`` mask chosen by lowest index among tied
    changed entries, share of it the ``"moved"`` mask keeps)."""
    results = {}
    for density in densities:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fill, which the first table counts
            masks = {rank: diff_mask(base, finetuned, density, tolerance=TOLERANCE, compare_dtype=torch.bfloat16,
                                      rank_changed=rank)
                     for rank in ("rounded", "moved")}
        rounded, tied = masks["rounded"], 0
        for name, _, delta in iter_deltas(base, finetuned, compare_dtype=torch.bfloat16, desc="ties"):
            kept, size = rounded.selections[name], delta.abs()
            if int((size > TOLERANCE).sum()) <= int(kept.sum()):  # every changed entry kept: nothing ranked
                continue
            at_threshold = size == size[kept].min()
            if int(at_threshold.sum()) > int((kept & at_threshold).sum()):  # a tie the budget cuts
                tied += int((kept & at_threshold).sum())
        results[density] = (tied / rounded.num_selected, rounded.intersection(masks["moved"]).num_selected
                            / rounded.num_selected)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="a full run's final weights (safetensors)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3])
    parser.add_argument("--model-dir", default=None, help="the base model (default: the cached SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    base = choose_by.model_dir_of(args)
    changed, shares = fill_shares(base, args.weights, args.densities)
    lines = [f"Post-hoc masks of `{args.weights.name}` (bf16 diff; {changed:.2%} of all entries changed), written by "
             f"`benchmarks/posthoc_fill_share.py`.", "",
             "| density | tensors that changed fewer entries than the density | share of the mask that is fill |",
             "|---|---|---|"]
    lines += [f"| {d:g} | {short} of {total} | {share:.1%} |" for d, (short, total, share) in shares.items()]
    lines += ["", "| density | share of the mask ranked by the rounded \\|Δ\\| that its ties chose by lowest index | "
              "share of it also in the mask ranked by the move before rounding |", "|---|---|---|"]
    lines += [f"| {d:g} | {tied:.1%} | {same:.1%} |" for d, (tied, same) in rank_ties(
        base, args.weights, args.densities).items()]
    write_result("\n".join(lines) + "\n", args.out, write=args.out is not None)


if __name__ == "__main__":
    main()
