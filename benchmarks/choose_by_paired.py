"""Paired difference of two choose-by rows' held-out reward (the README's "paired" figures), from the run JSONs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by_paired.py addition sparse-gradient-0.05@1e-5 \
        sparse-gradient-0.1@1e-5 [--step 20] [--steps 120] [--runs benchmarks/results/choose_by/runs]

A row is named as in the report (``RunConfig.row``) and its learning rate as any float spelling (``1e-4`` and
``0.0001`` are the same run). Runs are those of the sweep's protocol (``choose_by.py``'s default sizes), read by the
report's own loader; ``--steps`` picks runs of another length (stage Q's 120-step runs). Rows are paired over seeds
and prompts (``choosing.stats.difference_interval``) on the seeds both ran (a row with extra seeds, e.g. stage I's
seeds 3-4, is compared on the shared ones, so a figure computed before those seeds existed still reproduces);
``--all-seeds``, or rows without a shared seed, resample the two rows' seeds independently instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import choose_by  # noqa: E402
from choosing.report import load_runs  # noqa: E402
from choosing.runs import RunConfig  # noqa: E402
from choosing.stats import Interval, difference_interval, same_seeds, success_matrix  # noqa: E402

RUNS = Path(__file__).resolve().parent / "results" / "choose_by" / "runs"


def parse_row(row_at_lr: str) -> tuple[str, float]:
    """``"sparse-gradient-0.1@1e-5"`` -> ``("sparse-gradient-0.1", 1e-5)``."""
    row, sep, lr = row_at_lr.rpartition("@")
    try:
        value = float(lr)
    except ValueError:
        value = None
    if not sep or not row or value is None or value <= 0:
        raise ValueError(f"expected ROW@LR with a positive float lr (e.g. sparse-gradient-0.1@1e-5), got {row_at_lr!r}")
    return row, value


def runs_of(records: list[dict], task: str, row: str, lr: float) -> list[dict]:
    """The finished runs of one row at one lr, by seed; a clear error names what exists when none match."""
    of_task = [r for r in records if r["config"]["task"] == task]
    matched = [r for r in of_task if r["row"] == row and math.isclose(r["config"]["learning_rate"], lr, rel_tol=1e-9)]
    if not matched:
        known = sorted({f"{r['row']}@{r['config']['learning_rate']:g}" for r in of_task if r["row"] != "base"})
        raise ValueError(f"no finished runs of {task} {row} at lr {lr:g}; finished rows of {task}: "
                         f"{', '.join(known) or 'none'}")
    return sorted(matched, key=lambda r: r["config"]["seed"])


def paired_difference(runs_dir: Path, protocol: RunConfig, task: str, row: str, reference: str,
                      step: int | None = None, all_seeds: bool = False) -> tuple[list[int], list[int], Interval]:
    """Seeds used of each row and the interval of (row - reference) held-out reward."""
    records = load_runs(runs_dir, protocol)
    a = runs_of(records, task, *parse_row(row))
    b = runs_of(records, task, *parse_row(reference))
    shared = {r["config"]["seed"] for r in a} & {r["config"]["seed"] for r in b}
    if shared and not all_seeds:
        a, b = ([r for r in runs if r["config"]["seed"] in shared] for runs in (a, b))
    seeds_a, seeds_b = [r["config"]["seed"] for r in a], [r["config"]["seed"] for r in b]
    interval = difference_interval(success_matrix(a, step), success_matrix(b, step), same_seeds=same_seeds(a, b))
    return seeds_a, seeds_b, interval


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("row", help="row@lr, e.g. sparse-gradient-0.1@1e-5")
    parser.add_argument("reference", help="row@lr subtracted from the first")
    parser.add_argument("--step", type=int, default=None, help="evaluation step (default: the last)")
    parser.add_argument("--steps", type=int, default=None,
                        help="runs trained this many steps (default: the protocol's, choose_by.py's --steps)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of run JSONs (default: %(default)s)")
    parser.add_argument("--all-seeds", action="store_true",
                        help="every seed of both rows, resampled independently (default: the shared seeds, paired)")
    args = parser.parse_args(argv)
    protocol = choose_by.protocol_of(choose_by.parse_args([] if args.steps is None else ["--steps", str(args.steps)]))
    try:
        seeds_a, seeds_b, interval = paired_difference(args.runs, protocol, args.task, args.row, args.reference,
                                                       args.step, args.all_seeds)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.task} {args.row} - {args.reference} (seeds {seeds_a} vs {seeds_b}, step {args.step or 'last'}): "
          f"{interval.estimate:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]")


if __name__ == "__main__":
    main()
