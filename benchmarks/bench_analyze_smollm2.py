"""Time `sparse-rl analyze` on SmolLM2-135M-Instruct (fp32) against a finetuned checkpoint.

Without ``--finetuned`` it writes a synthetic one: a copy where ``--share`` of the entries of every tensor moved by
N(0, ``--size``²), saved in 100 MB shards (so the sharded index path is exercised). Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py --finetuned outputs/demo/final
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparse_rl.models import load_smollm2, smollm2_checkpoint


def write_synthetic(folder: Path, share: float, size: float, seed: int = 0) -> Path:
    model, _ = load_smollm2()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            moved = torch.rand(param.shape, generator=generator) < share
            param += size * torch.randn(param.shape, generator=generator) * moved
    model.save_pretrained(folder, max_shard_size="100MB")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", default=None, help="checkpoint folder (default: a synthetic sparse update)")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--size", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs/analysis_smollm2")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "analyze_smollm2.md"))
    parser.add_argument("analyze_args", nargs="*", help="extra arguments for sparse-rl analyze (after --)")
    args = parser.parse_args()
    base = smollm2_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        finetuned = args.finetuned or str(write_synthetic(Path(tmp) / "synthetic", args.share, args.size))
        command = [sys.executable, "-m", "sparse_rl.cli", "analyze", str(base), finetuned,
                   "--output-dir", args.output_dir, *args.analyze_args]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    print(done.stdout)
    print(f"wall time of `sparse-rl analyze` (process included): {seconds:.1f} s")
    what = (f"`{args.finetuned}`" if args.finetuned else
            f"a synthetic update ({args.share:.0%} of the entries of every tensor moved by N(0, {args.size:g}²), "
            "saved in 100 MB shards)")
    text = "\n".join([
        "# `sparse-rl analyze` on SmolLM2-135M-Instruct (fp32, CPU)", "",
        f"Base: the fp32 SmolLM2-135M-Instruct checkpoint; finetuned: {what}. {os.cpu_count()} cores, load average "
        f"{load:.1f} when started (other jobs shared the cores). Wall time including process start: "
        f"**{seconds:.0f} s**.", "",
        "Reproduce: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_analyze_smollm2.py"
        + (f" --finetuned {args.finetuned}`" if args.finetuned else "`"), "",
        "```", done.stdout.strip(), "```", ""])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
