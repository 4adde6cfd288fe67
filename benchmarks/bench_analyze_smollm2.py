"""Time `sparse-rl analyze` on SmolLM2-135M-Instruct (fp32) against a finetuned checkpoint.

Without ``--finetuned`` it writes a synthetic one: a copy where ``--share`` of the entries of every tensor moved by
N(0, ``--size``²), saved in 100 MB shards (so the sharded index path is exercised). Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py --finetuned outputs/demo/final
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py --grpo-steps 8 \
        --results benchmarks/results/analyze_smollm2_grpo.md   # two real GRPO runs, overlap + precision control
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import perturb_share

from sparse_rl.models import load_smollm2, smollm2_checkpoint


def write_synthetic(folder: Path, share: float, size: float, seed: int = 0) -> Path:
    model, _ = load_smollm2()
    perturb_share(model, share, size, seed)
    model.save_pretrained(folder, max_shard_size="100MB")
    return folder


def write_grpo_runs(folder: Path, steps: int, learning_rate: float, seeds=(0, 1)) -> list[Path]:
    """Full-finetuning GRPO runs (the few-shot arithmetic setup of bench_probe_discovery.py), one per seed, saved
    in fp32 so the analysis can set the exact diff beside the bf16 one."""
    import gc

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_probe_discovery import build_trainer

    torch.set_num_threads(1)  # see bench_probe_discovery.py --threads
    runs = []
    for seed in seeds:
        trainer = build_trainer(steps, str(folder / f"trainer-{seed}"), seed=seed, learning_rate=learning_rate)
        trainer.train()
        trainer.save_model(str(folder / f"grpo-seed{seed}"))
        runs.append(folder / f"grpo-seed{seed}")
        del trainer
        gc.collect()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", default=None, help="checkpoint folder (default: a synthetic sparse update)")
    parser.add_argument("--grpo-steps", type=int, default=0,
                        help="instead of a synthetic update, train two GRPO runs (seeds 0 and 1) for this many steps "
                             "and analyze the first with --other the second")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of the --grpo-steps runs")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--size", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs/analysis_smollm2")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "analyze_smollm2.md"))
    parser.add_argument("analyze_args", nargs="*", help="extra arguments for sparse-rl analyze (after --)")
    args = parser.parse_args()
    base = smollm2_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        extra = list(args.analyze_args)
        if args.grpo_steps:
            first, second = write_grpo_runs(Path(tmp), args.grpo_steps, args.lr)
            finetuned = str(first)
            extra += ["--other", str(second)]
        else:
            finetuned = args.finetuned or str(write_synthetic(Path(tmp) / "synthetic", args.share, args.size))
        command = [sys.executable, "-m", "sparse_rl.cli", "analyze", str(base), finetuned,
                   "--output-dir", args.output_dir, *extra]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    print(done.stdout)
    print(f"wall time of `sparse-rl analyze` (process included, training excluded): {seconds:.1f} s")
    if args.grpo_steps:
        what = (f"{args.grpo_steps} steps of full-finetuning GRPO (lr {args.lr:g}, fp32, the few-shot arithmetic "
                "setup of bench_probe_discovery.py), seed 0, with the seed-1 run as `--other`")
    elif args.finetuned:
        what = f"`{args.finetuned}`"
    else:
        what = (f"a synthetic update ({args.share:.0%} of the entries of every tensor moved by N(0, {args.size:g}²), "
                "saved in 100 MB shards)")
    text = "\n".join([
        "# `sparse-rl analyze` on SmolLM2-135M-Instruct (fp32, CPU)", "",
        f"Base: the fp32 SmolLM2-135M-Instruct checkpoint; finetuned: {what}. {os.cpu_count()} cores, load average "
        f"{load:.1f} when started (other jobs shared the cores). Wall time including process start: "
        f"**{seconds:.0f} s**.", "",
        "Reproduce: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py "
        + " ".join(sys.argv[1:]) + "`", "",
        f"![per-layer update sparsity and rank]({Path(args.results).with_suffix('.png').name})", "",
        "```", done.stdout.strip(), "```", ""])
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    shutil.copy(Path(args.output_dir) / "update_sparsity.png", results.with_suffix(".png"))


if __name__ == "__main__":
    main()
