"""Reproduce the research claims about sparse RL updates on SmolLM2-135M-Instruct (CPU, one torch thread).

Task: the demo's few-shot addition with operands up to 19 (``sparse_rl.demo``), GRPO with 8 completions of 6 tokens
for 2 prompts per step, reward 1 when the first integer of the completion is the sum. Held-out evaluation: sampled
reward (temperature 1) on addition pairs never seen in training, with the same sampling seed for every model.

Protocol (as the research measured it): the base weights are rounded to bf16 once; every run trains fp32 weights from
there (as mixed-precision trainers keep fp32 masters); checkpoints are compared after rounding to bf16 (the published
checkpoints are bf16), with the fp32 difference beside it; every claim is set beside the precision control (the
same update values moved to random entries of each tensor before rounding, ``sparse_rl.analysis.precision_control``).

Run plan (runs are shared; each run trains in its own process with one torch thread and is skipped when its
``run.json`` already exists, so an interrupted run resumes at the next missing run):

    full-s0        full finetuning, seed 0, checkpoints at 1/4, 1/2, 1 of the steps   -> experiments 1, 2, 3, 4, 5
    full-s1        full finetuning, seed 1, same checkpoints                          -> experiment 3
    sub-diff / sub-probe / sub-magnitude / sub-random   subnetwork-only GRPO           -> experiment 2
    entropy-q0.2   full finetuning, loss gradient on the top-20% entropy tokens only   -> experiment 4
    lora-r{r}      LoRA on all linear layers, rank matched to the subnetwork's count   -> experiment 5

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reproduce_research.py --mode quick             # minutes, smoke test
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nohup .venv/bin/python benchmarks/reproduce_research.py --mode full \\
        --experiments 1,3,2,4,5 > outputs/research_full.log 2>&1 &

Writes ``benchmarks/results/research/`` (quick mode: ``research_quick/``): ``expN.md``, CSVs and PNGs per experiment,
each as soon as that experiment finishes, and the summary ``benchmarks/results/research.md``.

Code: ``benchmarks/research/`` holds the pieces: ``runs.py`` (the plan's sizes, the task and one training run in its
own process), ``pool.py`` (the process pool), ``experiments.py`` (the five experiments), ``plots.py`` and
``summary.py`` (the summary page). This script is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # keep the nohup log readable

import torch  # noqa: E402
from research.experiments import DEFAULT_COMMAND, Research  # noqa: E402
from research.pool import RunPool  # noqa: E402
from research.runs import Plan, run_probe_worker, run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument("--experiments", default="1,3,2,4,5",
                        help="comma-separated experiment numbers, run in the order given")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's steps per run")
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate (default 3e-5)")
    parser.add_argument("--work-dir", default=None, help="checkpoints and runs (default outputs/research-<mode>)")
    parser.add_argument("--results", default=None,
                        help="result folder (default benchmarks/results/research, quick: research_quick)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="independent runs trained at once, one process and one torch thread each")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite the summary markdown from the experiments' finished tables, train nothing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.probe_worker:
        return run_probe_worker(args.probe_worker)
    try:
        experiments = [int(x) for x in args.experiments.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--experiments must be comma-separated numbers 1-5, got {args.experiments!r}")
    if not experiments or any(e not in (1, 2, 3, 4, 5) for e in experiments):
        parser.error(f"--experiments must list numbers among 1-5, got {args.experiments!r}")
    torch.set_num_threads(1)
    plan = Plan.for_mode(args.mode, args.steps, args.lr)
    work = Path(args.work_dir or ROOT / "outputs" / f"research-{args.mode}")
    default_results = "research" if args.mode == "full" else "research_quick"
    results = Path(args.results or ROOT / "benchmarks" / "results" / default_results)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    command = " ".join([DEFAULT_COMMAND] + [a for a in sys.argv[1:] if a != "--summary-only"])
    research = Research(plan, work, results, RunPool(__file__, args.parallel), command)
    if args.summary_only:
        return research.write_summary()
    research.run_all(experiments)


if __name__ == "__main__":
    main()
