"""How much of a post-hoc mask is fill: the share of a ``diff_mask(..., density, compare_dtype=bf16)`` mask that bf16
rounding left unchanged, at several densities, for one full run's final weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/posthoc_fill_share.py WEIGHTS.safetensors \
        [--densities 0.01 0.05 0.1 0.3] [--out benchmarks/results/posthoc_fill_share.md]

Where a tensor changed fewer entries than the density asks for, the rest of its budget is fill (``diff_mask``'s
``fill``: the lowest-index block with ``"rounded"``, the entries nearest to changing with ``"moved"``). One pass over
the diff counts each tensor's changed entries (|delta| > the tolerance after rounding both sides to bf16, as the mask
itself counts them); the fill at every density follows from the counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import choose_by  # noqa: E402
from _common import write_result  # noqa: E402

from sparse_rl.discovery import budget_shortfall, diff_mask, selected_count  # noqa: E402


def fill_shares(base, finetuned, densities) -> tuple[float, dict[float, tuple[int, int, float]]]:
    """The share of all entries that changed in bf16, and per density (tensors short of it, tensors, share of the
    mask that is fill)."""
    changed = diff_mask(base, finetuned, compare_dtype=torch.bfloat16)
    shares = {}
    for density in densities:
        short = budget_shortfall(changed.selections, density)
        budget = sum(selected_count(s.numel(), density) for s in changed.selections.values())
        shares[density] = (sum(map(bool, short.values())), len(short), sum(short.values()) / budget)
    return changed.num_selected / changed.num_total, shares


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="a full run's final weights (safetensors)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3])
    parser.add_argument("--model-dir", default=None, help="the base model (default: the cached SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    changed, shares = fill_shares(choose_by.model_dir_of(args), args.weights, args.densities)
    lines = [f"Post-hoc masks of `{args.weights.name}` (bf16 diff; {changed:.2%} of all entries changed), written by "
             f"`benchmarks/posthoc_fill_share.py`.", "",
             "| density | tensors that changed fewer entries than the density | share of the mask that is fill |",
             "|---|---|---|"]
    lines += [f"| {d:g} | {short} of {total} | {share:.1%} |" for d, (short, total, share) in shares.items()]
    write_result("\n".join(lines) + "\n", args.out, write=args.out is not None)


if __name__ == "__main__":
    main()
