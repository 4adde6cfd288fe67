"""``sparse-rl`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_DTYPES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="GRPO on SmolLM2-135M-Instruct training a 5%% subnetwork, on CPU")
    demo.add_argument("--density", type=float, default=None, help="share of each matrix trained (default 0.05)")
    demo.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the demo's preset)")
    demo.add_argument("--output-dir", default="outputs/demo")
    _add_analyze_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(density=args.density, steps=args.steps, output_dir=args.output_dir)
    elif args.command == "analyze":
        return run_analyze(args)
    return 0


def _add_analyze_parser(sub) -> None:
    analyze = sub.add_parser(
        "analyze", help="update sparsity, rank and precision control of FINETUNED against BASE",
        description="Compare two checkpoints (folders with model.safetensors or a sharded index, or .safetensors "
                    "files) tensor by tensor: update sparsity overall and per matrix, rank of each matrix update, "
                    "and how much of the sparsity (and of the overlap with a second run) rounding to --dtype "
                    "explains. Writes a CSV and a PNG to --output-dir.")
    analyze.add_argument("base", help="checkpoint before finetuning")
    analyze.add_argument("finetuned", help="checkpoint after finetuning")
    analyze.add_argument("--other", default=None,
                         help="a second finetuned checkpoint from the same base (another seed): adds the overlap of "
                              "the two updates and its precision control")
    analyze.add_argument("--tolerance", type=float, default=1e-5,
                         help="an entry counts as changed when |Δ| > tolerance (default 1e-5, the paper's)")
    analyze.add_argument("--compare-dtype", choices=_DTYPES, default=None,
                         help="round both checkpoints to this dtype before the sparsity/rank tables (the paper loads "
                              "both in bfloat16); default: compare as stored")
    analyze.add_argument("--dtype", choices=_DTYPES, default="bfloat16",
                         help="stored dtype whose rounding the precision control models (default bfloat16)")
    analyze.add_argument("--rank-rtol", type=float, default=None,
                         help="relative singular-value tolerance of the rank (default max(m, n) * 2^-23, "
                              "torch.linalg.matrix_rank's)")
    analyze.add_argument("--no-rank", action="store_true", help="skip the rank of each matrix update")
    analyze.add_argument("--exclude", nargs="*", default=(), help="substrings of tensor names to leave out")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the null model's shuffles")
    analyze.add_argument("--output-dir", default="outputs/analysis")
    analyze.add_argument("--save-mask", default=None,
                         help="also save the changed entries as a SubnetworkMask (.safetensors) at this path")


def run_analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis import analyze_update, mask_overlap, precision_control
    from .discovery import diff_mask

    problem = _unwritable_outputs(Path(args.output_dir), args.save_mask)
    if problem:  # before minutes of analysis, not after
        print(f"sparse-rl analyze: error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    compare_dtype = getattr(torch, args.compare_dtype) if args.compare_dtype else None
    try:
        report = analyze_update(args.base, args.finetuned, args.tolerance, rank=not args.no_rank,
                                rank_rtol=args.rank_rtol, compare_dtype=compare_dtype, exclude=args.exclude,
                                keep_mask=bool(args.save_mask or args.other))
        control = precision_control(args.base, args.finetuned, other=args.other, dtype=getattr(torch, args.dtype),
                                    tolerance=args.tolerance, seed=args.seed, exclude=args.exclude)
        overlap = None
        if args.other:
            other_mask = diff_mask(args.base, args.other, tolerance=args.tolerance, exclude=args.exclude,
                                   compare_dtype=compare_dtype)
            overlap = mask_overlap(report.mask, other_mask)
    except (FileNotFoundError, ValueError) as error:
        print(f"sparse-rl analyze: error: {error}", file=sys.stderr)
        return 2

    output = Path(args.output_dir)
    print(report.table())
    if overlap is not None:
        print(f"overlap with {args.other}: {overlap.summary()}")
    print(control.summary())
    csv_path = report.write_csv(output / "update_sparsity.csv")
    print(f"per-tensor table: {csv_path}")
    try:
        print(f"per-layer plot: {report.plot(output / 'update_sparsity.png')}")
    except ImportError as error:
        print(f"per-layer plot skipped: {error}", file=sys.stderr)
    if args.save_mask:
        report.mask.save(args.save_mask)
        print(f"mask of the changed entries: {args.save_mask} (density {report.mask.density:.4%})")
    print(f"analyzed in {time.perf_counter() - start:.1f} s")
    return 0


def _unwritable_outputs(output_dir: Path, save_mask: str | None) -> str | None:
    """Why the analysis could not write its outputs, or None."""
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output-dir {output_dir} is a file, not a folder"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create --output-dir {output_dir}: {error.strerror}"
    if save_mask is not None:
        target = Path(save_mask)
        if target.is_dir():
            return f"--save-mask {target} is a folder; give a file path such as {target / 'mask.safetensors'}"
        if not target.parent.is_dir():
            return f"--save-mask {target}: its folder {target.parent} does not exist"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
