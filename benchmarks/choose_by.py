"""The table a user chooses by (issue 18): full finetuning vs LoRA vs sparse_rl, GRPO on SmolLM2-135M-Instruct.

Every run is one process with one torch thread that writes one JSON to ``benchmarks/results/choose_by/runs/``;
runs whose JSON exists are skipped, so the sweep resumes where it stopped. Which runs, and in which order, is in
``benchmarks/choosing/plan.py`` (learning-rate sweeps of the decisive rows first). ``--report`` writes
``benchmarks/results/choose_by.md`` and the plot from whatever runs exist.

    # the sweep (resumable; `kill <its pid>` stops it and its runs, `kill -9 <its pid>` only the sweep: a sweep
    # started again counts the runs still training toward --parallel, so new code can take over without a loss)
    nohup env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py --parallel 1 \\
        > outputs/choose_by/sweep.log 2>&1 &
    # the report from the finished runs
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py --report
    # a smoke test in a scratch folder
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py --steps 2 --eval-pairs 16 --eval-every 1 \\
        --max-runs 2 --results /tmp/choose_by
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common` and `choosing` when imported from tests
# the sparse_rl of this checkout, not the one an editable install points at: a sweep run from a separate worktree
# keeps training with its own code while the main checkout changes
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from choosing.runs import RunConfig, load_result, run_one, running_pid, weights_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "choose_by"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once, one process and one thread each")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=4, help="completion tokens (training and evaluation)")
    parser.add_argument("--probe-steps", type=int, default=4)
    parser.add_argument("--eval-pairs", type=int, default=256, help="held-out prompts")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    parser.add_argument("--tasks", default="addition,subtraction", help="main task first")
    parser.add_argument("--extra-seeds", type=int, default=0, help="seeds beyond 3 for every row")
    parser.add_argument("--max-runs", type=int, default=None, help="start at most this many runs, then stop")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="result folder (runs/ inside; the report goes beside it as <folder>.md)")
    parser.add_argument("--work", type=Path, default=None,
                        help="logs, trainer folders, full runs' final weights (default outputs/choose_by)")
    parser.add_argument("--model-dir", default=None, help="model folder (default: the cached SmolLM2-135M)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--report", action="store_true", help="write the report from the finished runs")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    for name in ("steps", "prompts", "generations", "tokens", "probe_steps", "eval_pairs", "eval_samples",
                 "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.work is None:
        args.work = ROOT / "outputs" / "choose_by" if args.results == DEFAULT_RESULTS else args.results / "work"
    return args


def protocol_of(args) -> RunConfig:
    return RunConfig(method="base", steps=args.steps, prompts_per_step=args.prompts, num_generations=args.generations,
                     max_completion_length=args.tokens, probe_steps=args.probe_steps, eval_pairs=args.eval_pairs,
                     eval_samples=args.eval_samples, eval_every=args.eval_every)


def model_dir_of(args):
    if args.model_dir:
        return args.model_dir
    from sparse_rl.models import smollm2_checkpoint

    return str(smollm2_checkpoint())


def sweep_command(argv) -> str:
    return "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py " + shlex.join(argv)


# ---------------------------------------------------------------------------------------------- worker
def worker(job_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    job = json.loads(job_path.read_text())
    source = job.get("posthoc_source")
    run_one(RunConfig(**job["config"]), Path(job["runs_dir"]), model_dir=job["model_dir"], work_dir=Path(job["work"]),
            weights_dir=Path(job["work"]) / "weights", posthoc_source=Path(source) if source else None,
            command=job["command"])


# ---------------------------------------------------------------------------------------------- scheduler
def sweep(args, argv) -> int:
    from choosing.plan import build_plan

    runs_dir, work = args.results / "runs", args.work
    for folder in (runs_dir, work / "logs", work / "jobs"):
        folder.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_of(args)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    protocol = protocol_of(args)
    command = sweep_command(argv)
    if not args.dry_run:
        (args.results / "command.txt").write_text(command + "\n")
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    failed: set[str] = set()

    def stop(signum, frame):  # `kill <sweep pid>` stops its runs too (an unfinished run leaves no JSON)
        for process, _, _ in running.values():
            process.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    started_runs = 0
    while True:
        reaped = False
        for run_id, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            reaped = True
            log.close()
            del running[run_id]
            if process.returncode:
                failed.add(run_id)
                print(f"[{run_id}] FAILED (exit {process.returncode}), log {work / 'logs' / run_id}.log", flush=True)
            else:
                print(f"[{run_id}] done in {time.time() - start:.0f}s", flush=True)
        if running and len(running) >= args.parallel and not reaped:  # every slot busy: nothing to plan
            time.sleep(5)
            continue
        plan = build_plan(protocol, runs_dir, work / "weights", model_dir, tasks, args.extra_seeds)
        # a run still training under an earlier sweep process (stopped with `kill -9`, so its runs go on) holds a
        # slot: the sweep can be restarted with new code without losing or doubling runs. Looked up before the
        # finished runs: a worker writes its JSON before it exits, so one that ends in between is seen as finished
        elsewhere = {p.config.run_id() for p in plan.ready if p.config.run_id() not in running
                     and running_pid(work, p.config.run_id()) not in (None, os.getpid())}
        busy = running.keys() | failed | elsewhere
        todo = [p for p in plan.ready if p.config.run_id() not in busy
                and (load_result(runs_dir, p.config) is None
                     or (p.regenerate and not weights_path(work / "weights", p.config).exists()))]
        first: dict[str, object] = {}
        for p in todo:  # a regeneration can be planned by several post-hoc rows: keep its first place
            first.setdefault(p.config.run_id(), p)
        todo = list(first.values())
        if args.dry_run:
            done = sum(load_result(runs_dir, p.config) is not None for p in plan.ready)
            print(f"{done} done, {len(todo)} ready to run (others running), {len(plan.waiting)} waiting")
            for p in todo:
                print(f"  ready  [{p.stage}] {p.config.run_id()}")
            for w in plan.waiting:
                print(f"  waits  {w}")
            return 0
        limit_reached = args.max_runs is not None and started_runs >= args.max_runs
        while todo and len(running) + len(elsewhere) < args.parallel and not limit_reached:
            item = todo.pop(0)
            run_id = item.config.run_id()
            job = {"config": item.config.to_dict(), "runs_dir": str(runs_dir), "model_dir": model_dir,
                   "work": str(work), "posthoc_source": str(item.posthoc_source) if item.posthoc_source else None,
                   "command": command, "stage": item.stage}
            job_path = work / "jobs" / f"{run_id}.json"
            job_path.write_text(json.dumps(job, indent=1))
            log = (work / "logs" / f"{run_id}.log").open("w")
            process = subprocess.Popen([sys.executable, __file__, "--worker", str(job_path)], stdout=log,
                                       stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            (work / "jobs" / f"{run_id}.pid").write_text(str(process.pid))
            running[run_id] = (process, log, time.time())
            started_runs += 1
            limit_reached = args.max_runs is not None and started_runs >= args.max_runs
            print(f"[{run_id}] started ({item.stage}), pid {process.pid}", flush=True)
        if elsewhere:  # their end is seen by the next plan only, so look again at a slower pace
            time.sleep(30)
            continue
        if not running:
            if failed:
                print(f"failed runs: {sorted(failed)}", flush=True)
            print("nothing left to start" + ("" if todo else f"; waiting: {len(plan.waiting)}"), flush=True)
            return 1 if failed else 0
        time.sleep(5)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.report:
        from choosing.report import write_report

        write_report(args.results, protocol_of(args), model_dir_of(args), tuple(args.tasks.split(",")),
                     args.extra_seeds, args.work)
        return 0
    return sweep(args, argv)


if __name__ == "__main__":
    sys.exit(main())
