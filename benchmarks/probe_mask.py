"""Save the demo's gradient-probe mask at a given density, for benchmarks that need a real (not random) mask.

The mask is probed exactly as ``make demo`` probes it (4 batches of the demo's GRPO loss on SmolLM2-135M-Instruct,
per-tensor budget), at any density:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_mask.py --density 0.01 \\
        --output outputs/probe_masks/probe_1pct.safetensors

then e.g. ``benchmarks/bench_optimizer_step.py --mask outputs/probe_masks/probe_1pct.safetensors``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_rl.demo import DemoConfig, build_demo_trainer, demo_rows
    from sparse_rl.discovery import ProbeOptions, gradient_mask_from_trainer
    from sparse_rl.models import smollm2_checkpoint

    config = DemoConfig(density=args.density, output_dir="outputs/probe_mask_trainer")
    checkpoint = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    train_rows, _ = demo_rows(config)
    trainer = build_demo_trainer(config, model, tokenizer, train_rows)
    start = time.time()
    mask = gradient_mask_from_trainer(trainer, args.density, ProbeOptions(steps=config.probe_steps))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    mask.save(args.output)
    print(f"{mask.num_selected:,} of {mask.num_total:,} entries ({mask.num_selected / mask.num_total:.2%}) probed in "
          f"{time.time() - start:.0f}s, saved to {args.output}")


if __name__ == "__main__":
    main()
