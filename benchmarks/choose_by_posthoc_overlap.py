"""How much do the post-hoc masks of the choose-by runs share, across seeds and across tasks?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by_posthoc_overlap.py [--work outputs/choose_by]

The post-hoc mask (the full run's bf16 diff, cut to 10% of every tensor) led on both tasks, but it needs a finished
full run of the same seed and task. If the masks of other seeds, or of the other task, share most of their entries,
one full run could serve many; if they share little more than chance, each mask is tied to its own run. This reads
the full runs' final weights that ``choose_by.py`` keeps in ``WORK/weights`` and prints, per pair of runs, the
paper's overlap |I1 ∩ I2| / |I1| against two random masks of the same per-tensor counts. It also prints the share of
entries each run changed in bf16: where a tensor changed fewer entries than the density, the mask is filled with
unchanged entries by index (the same in every run), which would inflate the overlap, so those tensors are counted.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import choose_by  # noqa: E402
from _common import write_result  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from sparse_rl.analysis import mask_overlap  # noqa: E402
from sparse_rl.discovery import budget_shortfall, diff_mask, magnitude_mask  # noqa: E402
from sparse_rl.mask import SubnetworkMask  # noqa: E402


def posthoc_masks(base, finetuned, density: float) -> tuple[SubnetworkMask, SubnetworkMask, float, int]:
    """The post-hoc mask (``diff_mask(..., compare_dtype=bf16, fill="rounded", rank_changed="rounded")``, as the
    choose-by runs at 10% cut it: the lowest-index fill, the changed entries by their rounded |Δ|), its part that
    changed in bf16, the share of all entries that changed, and how many tensors changed fewer than ``density`` of
    theirs (filled). Two passes over the diff, so the mask is diff_mask's own rather than a copy of its scoring."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fill diff_mask warns about is counted in the table
        mask = diff_mask(base, finetuned, density, compare_dtype=torch.bfloat16, fill="rounded",
                         rank_changed="rounded")
    changed = diff_mask(base, finetuned, tolerance=0.0, compare_dtype=torch.bfloat16)  # delta != 0 in bf16
    moved = SubnetworkMask({n: mask.selections[n] & c for n, c in changed.selections.items()})
    short = sum(map(bool, budget_shortfall(changed.selections, density).values()))
    return mask, moved, changed.num_selected / changed.num_total, short


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/choose_by"))
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    weights = sorted((args.work / "weights").glob("*__full__*.safetensors"))
    if len(weights) < 2:
        raise SystemExit(f"need the final weights of at least 2 full runs in {args.work / 'weights'}, found "
                         f"{len(weights)}: run benchmarks/choose_by.py first")
    base = choose_by.model_dir_of(args)
    lines = [f"Post-hoc masks at {args.density:g} of every tensor (bf16 diff of each full run's final weights in "
             f"`{args.work / 'weights'}`), written by `benchmarks/choose_by_posthoc_overlap.py`.", "",
             "| full run | entries changed in bf16 | tensors that changed fewer than the density (mask filled by "
             "index) | share of the mask that changed |", "|---|---|---|---|"]
    masks, moved = {}, {}
    for path in weights:
        name = path.stem.removesuffix("__af8e5c")
        masks[name], moved[name], share, short = posthoc_masks(base, path, args.density)
        lines.append(f"| `{name}` | {share:.3f} | {short} of {len(masks[name].selections)} "
                     f"| {moved[name].num_selected / masks[name].num_selected:.3f} |")
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    smallest = magnitude_mask(model, args.density, largest=False)
    for mask in masks.values():
        if set(mask.selections) != set(smallest.selections):
            raise SystemExit("the weights files and the model name different tensors: overlaps would be wrong")
    lines += ["", "Overlap |I1 ∩ I2| / |I1| against two random masks of the same per-tensor counts; `moved` keeps "
              "only each mask's entries that changed in bf16 (the index-filled rest is the same in every run).", "",
              "| mask 1 | mask 2 | overlap (chance) | moved entries only: overlap (chance) | Jaccard |",
              "|---|---|---|---|---|"]
    for a, b in itertools.combinations(masks, 2):
        whole, part = mask_overlap(masks[a], masks[b]), mask_overlap(moved[a], moved[b])
        lines.append(f"| `{a}` | `{b}` | {whole.overlap:.3f} ({whole.chance_overlap:.3f}) | {part.overlap:.3f} "
                     f"({part.chance_overlap:.3f}) | {whole.jaccard:.3f} |")
    for a in masks:
        whole, part = mask_overlap(masks[a], smallest), mask_overlap(moved[a], smallest)
        lines.append(f"| `{a}` | smallest \\|w\\| 10% | {whole.overlap:.3f} ({whole.chance_overlap:.3f}) "
                     f"| {part.overlap:.3f} ({part.chance_overlap:.3f}) | {whole.jaccard:.3f} |")
    write_result("\n".join(lines) + "\n", args.out, write=args.out is not None)


if __name__ == "__main__":
    main()
