"""Paired difference of two choose-by rows' held-out reward (the README's "paired" figures), from the run JSONs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by_paired.py addition sparse-gradient-0.05@1e-05 \
        sparse-gradient-0.1@1e-05 [--step 20]

Rows with the same seeds are paired over seeds and prompts (``choosing.stats.difference_interval``).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choosing.stats import difference_interval, success_matrix  # noqa: E402

RUNS = Path(__file__).resolve().parent / "results" / "choose_by" / "runs"


def runs_of(task: str, row_at_lr: str) -> list[dict]:
    row, lr = row_at_lr.split("@")
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob(f"{task}__{row}__lr{lr}__s*.json"))]
    if not records:
        raise SystemExit(f"no finished runs of {task} {row} at lr {lr} in {RUNS}")
    return sorted(records, key=lambda r: r["config"]["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("row", help="row@lr, e.g. sparse-gradient-0.1@1e-05")
    parser.add_argument("reference", help="row@lr subtracted from the first")
    parser.add_argument("--step", type=int, default=None, help="evaluation step (default: the last)")
    args = parser.parse_args()
    a, b = runs_of(args.task, args.row), runs_of(args.task, args.reference)
    seeds_a, seeds_b = [r["config"]["seed"] for r in a], [r["config"]["seed"] for r in b]
    interval = difference_interval(success_matrix(a, args.step), success_matrix(b, args.step),
                                   same_seeds=seeds_a == seeds_b)
    print(f"{args.task} {args.row} - {args.reference} (seeds {seeds_a} vs {seeds_b}, step {args.step or 'last'}): "
          f"{interval.estimate:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]")


if __name__ == "__main__":
    main()
