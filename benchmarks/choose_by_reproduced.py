"""Did each rerun reproduce its first run? (the README's "reruns reproduced every reward exactly").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by_reproduced.py [--runs benchmarks/results/choose_by/runs]

A run is rerun when its final weights are lost (a post-hoc mask needs them); the rerun's JSON replaces the first and
keeps a ``previous_run`` summary. The first run's full record lives in git history: this compares, field by field,
the first committed version of each rerun's file with the current one. Every held-out evaluation (per-prompt correct
counts) and every training reward must be equal; times, load, memory and the code version may differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choosing.runs import RunConfig  # noqa: E402

RUNS = Path(__file__).resolve().parent / "results" / "choose_by" / "runs"
RESULTS = ("evals.correct", "evals.step", "train_reward", "final_reward", "trained_entries", "config")


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True, check=True).stdout


def first_committed(path: Path) -> dict | None:
    """The file as first committed (the first run's record), or None when git has no earlier version of it."""
    commits = _git(path, "log", "--format=%H", "--", path.name).split()
    if not commits:
        return None
    root = Path(_git(path, "rev-parse", "--show-toplevel").strip())
    record = json.loads(_git(path, "show", f"{commits[-1]}:{path.resolve().relative_to(root.resolve())}"))
    return None if "previous_run" in record else record


def _field(record: dict, name: str):
    if name.startswith("evals."):
        return [e[name.split(".", 1)[1]] for e in record["evals"]]
    if name == "config":  # as a RunConfig, so a first run recorded before a field with a default existed matches
        return RunConfig(**record["config"])
    return record.get(name)


def differences(first: dict, rerun: dict) -> list[str]:
    """The result fields (not times) whose values differ between the first run and its rerun."""
    return [name for name in RESULTS if _field(first, name) != _field(rerun, name)]


def check(runs_dir: Path) -> list[tuple[str, list[str] | None]]:
    """Per rerun in ``runs_dir``: its id and the fields that differ ([] reproduced; None: no first run in git)."""
    out = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        rerun = json.loads(path.read_text())
        if "previous_run" not in rerun:
            continue
        first = first_committed(path)
        out.append((rerun["id"], None if first is None else differences(first, rerun)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of run JSONs (default: %(default)s)")
    args = parser.parse_args(argv)
    results = check(args.runs)
    if not results:
        print(f"no reruns in {args.runs}")
    for run_id, diff in results:
        verdict = ("first run not in git history" if diff is None else
                   "reproduced: every held-out and training reward equal" if not diff else
                   f"DIFFERS in {', '.join(diff)}")
        print(f"{run_id}: {verdict}")
    return 1 if any(diff for _, diff in results) else 0


if __name__ == "__main__":
    sys.exit(main())
