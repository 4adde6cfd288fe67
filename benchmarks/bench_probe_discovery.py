"""What does probe discovery cost? SmolLM2-135M-Instruct, the demo's GRPO task, CPU.

Times ``gradient_mask_from_trainer(trainer, 0.1, ProbeOptions(steps=K))`` (K = the demo's 4 probe batches) against
``trainer.train()`` for the demo's 20 steps of full finetuning on the same trainer. Each measurement runs in its
own process, so the peak RSS (``resource.getrusage(...).ru_maxrss``) is that of one operation on top of the same
loaded model. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_probe_discovery.py    # K=4, gradient + adam, 20 train steps
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_probe_discovery.py --steps 8 --train-steps 8 --scores gradient

Writes ``benchmarks/results/probe_discovery.md`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DENSITY = 0.1


def build_trainer(steps: int, output_dir: str):
    """The demo's GRPOTrainer (``sparse_rl.demo``: few-shot addition with operands up to 19, 2 prompts x 8
    completions of up to 6 tokens per step, lr 3e-5), dense: ``train()`` is full finetuning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_rl.demo import DemoConfig, addition_prompts, build_demo_trainer
    from sparse_rl.models import smollm2_checkpoint

    folder = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = DemoConfig(steps=steps, output_dir=output_dir)
    rows = addition_prompts(steps * config.prompts_per_step + 64, config.max_operand, config.seed)
    trainer = build_demo_trainer(config, model, tokenizer, rows)
    trainer.args.disable_tqdm = True
    return trainer


def rss_mb() -> float:
    """Current resident set size (MB), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(operation: str, steps: int, output_dir: str, threads: int) -> dict:
    import torch

    from sparse_rl.discovery import ProbeOptions, gradient_mask_from_trainer

    if threads:
        torch.set_num_threads(threads)
    trainer = build_trainer(steps, output_dir)
    ready_rss = rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    if operation == "train":
        trainer.train()
        detail = {"rewards": [round(e["reward"], 3) for e in trainer.state.log_history if "reward" in e]}
    else:
        score = operation.removeprefix("probe-")
        mask = gradient_mask_from_trainer(trainer, DENSITY, ProbeOptions(steps=steps, score=score))
        detail = {"mask_density": mask.density}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"operation": operation, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "ready_rss_mb": ready_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), **detail}


def run_child(operation: str, steps: int, output_dir: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", operation, "--steps", str(steps), "--run-dir", output_dir,
               "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_markdown(results: list[dict], path: Path, steps: int, train_steps: int, load: tuple[float, float]) -> str:
    train = next(r for r in results if r["operation"] == "train")

    def added(r: dict) -> float:
        return r["peak_rss_mb"] - r["ready_rss_mb"]

    lines = [
        "# Probe discovery cost on SmolLM2-135M-Instruct (CPU)",
        "",
        "The demo's GRPO task (`sparse_rl.demo.build_demo_trainer`: few-shot addition with operands up to 19, reward 1 "
        "if the first integer of the completion equals a + b, 2 prompts x 8 completions of up to 6 tokens per step, "
        f"lr 3e-5), fp32, `use_cpu=True`. Probe: `gradient_mask_from_trainer(trainer, {DENSITY}, "
        f"ProbeOptions(steps={steps}, score=...))` (what `make demo` runs before training); full finetuning: "
        f"`trainer.train()` for the demo's max_steps={train_steps} with dense AdamW. Each row is its own process; "
        "*ready RSS* is the resident memory after loading the model and building the trainer, *peak RSS* the "
        "process's `ru_maxrss`, so peak - ready is what the operation itself added.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {train['threads']}; load average "
        f"{load[0]:.1f} before / {load[1]:.1f} after (other jobs shared the cores, so absolute times are upper "
        "bounds; CPU seconds, process time of the operation, are less sensitive to that).",
        "",
        "| operation | steps | wall (s) | wall / step | CPU (s) | CPU vs train | ready RSS (MB) | peak RSS (MB) "
        "| peak - ready (MB) | peak - ready vs train |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = "full finetuning, trainer.train()" if r["operation"] == "train" else \
            f"probe, score=\"{r['operation'].removeprefix('probe-')}\""
        lines.append(
            f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['seconds'] / r['steps']:.1f} | "
            f"{r['cpu_seconds']:.1f} | "
            f"{r['cpu_seconds'] / train['cpu_seconds']:.2f}x | {r['ready_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{added(r):.0f} | {added(r) / added(train):.2f}x |")
    lines += ["", f"Rewards logged during the {train_steps} training steps (every 5): {train.get('rewards')}.", "",
              "How to read it: a probe step is a training step without the optimizer step (the trainer's own "
              "generation, reward and loss, then backward), so probing K batches costs about K steps of full "
              "finetuning in CPU time. The gradient/Fisher probe folds each gradient into one fp32 score per "
              "parameter during backward (no moments); the Adam-update score keeps three buffers (score and both "
              "moments). On this model the peak is set by generation and the backward pass (activations, "
              "49K-vocabulary logits), not by those buffers, so the gradient probe peaks about where training does.",
              "",
              "Reproduce: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_probe_discovery.py "
              f"--steps {steps} --train-steps {train_steps} "
              f"--scores {' '.join(r['operation'].removeprefix('probe-') for r in results[:-1])} "
              f"--threads {train['threads']}`",
              ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="K: probe batches (the demo probes 4)")
    parser.add_argument("--train-steps", type=int, default=20, help="full-finetuning steps (the demo trains 20)")
    parser.add_argument("--scores", nargs="+", default=["gradient", "adam"],
                        choices=["gradient", "fisher", "adam", "precision"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "probe_discovery.md"))
    parser.add_argument("--run-dir", default="outputs/bench_probe_discovery")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default). 1 by default: when other processes share "
                             "the cores, 2 threads ran a GRPO step ~15x slower than 1 (OpenMP oversubscription)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.run_dir, args.threads)))
        return
    load_before = os.getloadavg()[0]
    results = []
    for operation in [f"probe-{s}" for s in args.scores] + ["train"]:
        steps = args.train_steps if operation == "train" else args.steps
        result = run_child(operation, steps, args.run_dir, args.threads)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(write_markdown(results, Path(args.output), args.steps, args.train_steps,
                         (load_before, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
