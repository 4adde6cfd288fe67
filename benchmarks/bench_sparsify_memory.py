"""What set-up leaves resident: RSS after ``sparsify`` and the peak of the first training steps, with and without
``sparsify`` handing freed memory back to the OS (``sparse_rl._memory.return_freed_memory``: gc + glibc
``malloc_trim``), and with glibc's mmap threshold left dynamic (its default) or fixed at 128 KiB.

Cases: GRPO with gradient discovery (the probe's dense score buffers and its batches' activations) on the choose_by
protocol's batch (4 prompts x 8 completions of 4 tokens), the same with a random mask (no probe) and with LoRA at
the same trained count (no ``sparsify``), and DPO with a shared reference replacing the copy TRL loaded in its
constructor. glibc raises its mmap threshold (up to 32 MiB) each time a block it had mmapped is freed; after that,
blocks below the threshold come from the heap, which keeps freed pages resident and fragments. The probe frees
larger blocks than a training step does, so it leaves a higher threshold behind; ``MALLOC_MMAP_THRESHOLD_=131072``
fixes the threshold at glibc's starting value (and turns the adjustment off). One process per row, two at a time,
one torch thread; the benchmark itself never trims (the train-step benchmark does, before ``train()``, which hides
this). Prints and writes ``benchmarks/results/sparsify_memory.md``.

    python benchmarks/bench_sparsify_memory.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import child_command, cpu_description, emit_result, load_average, run_child, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sparsify_memory.md"
STEPS = 3
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc's starting value, no longer adjusted
# (case, trim, fixed mmap threshold): trim on/off where sparsify frees a lot, the threshold fixed for the GRPO rows
JOBS = [("grpo-gradient-probe", False, False), ("grpo-gradient-probe", True, False),
        ("grpo-gradient-probe", True, True), ("grpo-gradient-probe-4-passes", True, False),
        ("grpo-gradient-probe-4-passes", True, True), ("grpo-random-mask", True, False),
        ("grpo-random-mask", True, True),
        ("grpo-lora", True, False), ("grpo-lora", True, True),
        ("dpo-shared-reference-freed-copy", False, False), ("dpo-shared-reference-freed-copy", True, False)]


def child(case: str, trim: bool, output_dir: str) -> dict:
    import torch
    from _common import reset_peak, status_mib

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.discovery import ProbeOptions
    from sparse_rl.models import load_smollm2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if not trim:
        import sparse_rl.trl.training as training

        training.return_freed_memory = lambda: False
    model, tokenizer = load_smollm2()
    with torch.no_grad():  # memory-mapped checkpoint: make every weight resident first, as in the other benchmarks
        for param in model.parameters():
            param.sum()
    if case.startswith("grpo"):
        from sparse_rl.demo import DemoConfig, addition_prompts, build_demo_trainer

        demo = DemoConfig(steps=STEPS, prompts_per_step=4, num_generations=8, max_completion_length=4,
                          output_dir=output_dir)
        rows = addition_prompts(64, demo.max_operand, demo.seed)
        peft_config = None
        if case == "grpo-lora":
            from bench_train_step import lora_config_matching

            peft_config, _ = lora_config_matching(model, 0.1)
        trainer = build_demo_trainer(demo, model, tokenizer, rows, disable_tqdm=True, logging_steps=1,
                                     peft_config=peft_config)
        probe = ProbeOptions(passes=4 if case == "grpo-gradient-probe-4-passes" else 1)
        config = None if case == "grpo-lora" else \
            SparseConfig(density=0.1, discovery="gradient" if case.startswith("grpo-gradient-probe") else "random",
                         probe=probe)
    else:
        from bench_train_step import SETUPS, _build_dpo

        cls, kwargs = _build_dpo(model, tokenizer, SETUPS["sparse-10%-shared-compact"], STEPS, output_dir, None)
        trainer = cls(**kwargs)
        config = SparseConfig(density=0.1, discovery="random", shared_reference=True)
    before = status_mib("VmRSS")
    start, setup_cpu = time.perf_counter(), time.process_time()
    if config is not None:
        sparsify(trainer, config)
    seconds, setup_cpu = time.perf_counter() - start, time.process_time() - setup_cpu
    after, peak_setup = status_mib("VmRSS"), status_mib("VmHWM")
    reset = reset_peak()
    cpu = time.process_time()
    trainer.train()
    return {"case": case, "trim": trim, "fixed_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None,
            "rss_before_sparsify_mib": before, "rss_after_sparsify_mib": after, "sparsify_seconds": seconds,
            "sparsify_cpu_seconds": setup_cpu,
            "peak_before_train_mib": peak_setup, "peak_train_mib": status_mib("VmHWM") if reset else None,
            "rss_end_mib": status_mib("VmRSS"), "cpu_seconds_per_step": (time.process_time() - cpu) / STEPS}


def table(rows: list[dict]) -> str:
    lines = ["| case | freed memory returned | mmap threshold | RSS before sparsify | RSS after sparsify | "
             "process peak before train() | peak in train() | RSS after train() | sparsify CPU s | CPU s/step "
             "| process peak vs LoRA (same threshold) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lora = {r["fixed_mmap_threshold"]: max(r["peak_before_train_mib"], r["peak_train_mib"])
            for r in rows if r["case"] == "grpo-lora"}
    for row in rows:
        peak = max(row["peak_before_train_mib"], row["peak_train_mib"])
        reference = lora.get(row["fixed_mmap_threshold"]) if row["case"].startswith("grpo") else None
        versus = f"{peak / reference:.2f}x" if reference else "-"  # no LoRA row at this threshold in the run: "-"
        sparsified = row["case"] != "grpo-lora"
        after = f"{row['rss_after_sparsify_mib']:.0f} MiB" if sparsified else "-"
        setup_cpu = f"{row['sparsify_cpu_seconds']:.0f}" if sparsified and "sparsify_cpu_seconds" in row else "-"
        lines.append(f"| {row['case']} | {('yes' if row['trim'] else 'no') if sparsified else '-'} "
                     f"| {'fixed 128 KiB' if row['fixed_mmap_threshold'] else 'dynamic'} "
                     f"| {row['rss_before_sparsify_mib']:.0f} MiB | "
                     f"{after} "
                     f"| {row['peak_before_train_mib']:.0f} MiB | {row['peak_train_mib']:.0f} MiB "
                     f"| {row['rss_end_mib']:.0f} MiB | {setup_cpu} | {row['cpu_seconds_per_step']:.1f} | {versus} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=sorted({job[0] for job in JOBS}),
                        help="run only these cases' rows (include grpo-lora for the vs-LoRA column)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table goes (and its .json)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            emit_result(child(args.child[0], bool(int(args.child[1])), tmp))
        return 0
    subset = f" --cases {' '.join(args.cases)} --results {args.results}" if args.cases else ""
    load_before = load_average()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_child(child_command(__file__, "--child", job[0], int(job[1])),
                                                   env_extra=FIXED_MMAP_THRESHOLD if job[2] else None),
                             [job for job in JOBS if args.cases is None or job[0] in args.cases]))
    text = "\n".join([
        "# Memory that sparsify's set-up leaves resident (SmolLM2-135M-Instruct, fp32, CPU)", "",
        f"One process per row ({args.jobs} at a time), 1 torch thread, {STEPS} training steps after `sparsify`. "
        "*freed memory returned*: whether `sparsify` ends with gc + glibc `malloc_trim(0)` "
        "(`sparse_rl._memory.return_freed_memory`; 'no' replaces it with a no-op). *mmap threshold*: glibc's "
        "default (dynamic: raised each time an mmapped block is freed) or `MALLOC_MMAP_THRESHOLD_=131072` in the "
        "process's environment (fixed). *process peak before train()*: VmHWM after `sparsify` (the probe's own "
        "peak). *peak in train()*: VmHWM reset when `train()` starts. *CPU s/step*: the process's CPU time in "
        "`train()` per step. GRPO: the choose_by protocol's batch (4 prompts x 8 completions of 4 tokens), no "
        "reference (beta=0), activation checkpointing on (TRL's default: in `train()`, and in the probe since it "
        "checkpoints as training will), 10% density: `discovery=\"gradient\"` (4 probe batches; *-4-passes*: "
        "`ProbeOptions(passes=4)`, each pass scoring a quarter of the entries on the same batches) or `\"random\"`, "
        "or LoRA on "
        "every linear layer at the same trained count (rank 44, no `sparsify`). DPO: TRL loads its reference copy, "
        "`shared_reference=True` frees it.", "",
        f"Machine: {cpu_description()}; 1-minute load average {load_before:.1f} before / "
        f"{load_average():.1f} after. Python {platform.python_version()}.", "",
        table(rows), "",
        f"Reproduce: `python benchmarks/bench_sparsify_memory.py --jobs {args.jobs}{subset}`", ""])
    write_result(text, args.results)
    args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
