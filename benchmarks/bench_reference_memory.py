"""Peak memory of DPO training steps on SmolLM2-135M (fp32): TRL's reference copy against a shared reference.

Each mode runs in its own process (peak RSS is per process):
- ``copy``: TRL's default, a second full model built from the policy's checkpoint.
- ``shared``: the same trainer, ``SparseConfig(shared_reference=True)`` replaces the copy (it was loaded at
  construction, so the process-wide peak still saw it; the training-phase peak does not).
- ``shared-at-construction``: ``DPOTrainer(ref_model=SharedReference(model, mask))``, the copy is never loaded.

All modes train the same random 10% subnetwork with sparse_rl's MaskedAdamW, so only the reference differs; the
losses are printed to show the runs agree. Two peaks are reported: ``ru_maxrss`` for the whole process, and the
training-phase peak (VmHWM reset through /proc/self/clear_refs right before ``trainer.train()``).

    python benchmarks/bench_reference_memory.py            # writes benchmarks/results/reference_memory.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import (
    RESULTS_DIR,
    child_command,
    emit_result,
    peak_rss_mib,
    preference_dataset,
    release_memory,
    reset_peak,
    run_child,
    status_mib,
    write_result,
)

MODES = ("copy", "shared", "shared-at-construction")
RESULTS = RESULTS_DIR / "reference_memory.md"


def measure(mode: str, steps: int, density: float, batch_size: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.discovery import random_mask
    from sparse_rl.models import smollm2_checkpoint
    from sparse_rl.reference import SharedReference

    torch.set_num_threads(2)
    folder = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = DPOConfig(output_dir=f"/tmp/bench_reference_memory_{mode}", per_device_train_batch_size=batch_size,
                     max_steps=steps, learning_rate=1e-5, max_length=64, use_cpu=True, bf16=False,
                     report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    extra = {}
    if mode == "shared-at-construction":
        mask = random_mask(model, density, seed=0)
        extra["ref_model"] = SharedReference(model, mask)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(4 * batch_size * steps),
                         processing_class=tokenizer, **extra)
    shared = mode != "copy"
    config = (SparseConfig(mask=mask, shared_reference=True) if mode == "shared-at-construction"
              else SparseConfig(discovery="random", density=density, seed=0, shared_reference=shared))
    sparse = sparsify(trainer, config)
    if shared:
        reference_bytes = trainer.ref_model.extra_bytes()
    else:
        reference_bytes = sum(p.numel() * p.element_size() for p in trainer.ref_model.parameters())
    release_memory()
    reset = reset_peak()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak_train = status_mib("VmHWM") if reset else None
    release_memory()
    rss_after_train = status_mib("VmRSS")
    return {
        "mode": mode,
        "peak_process_mib": peak_rss_mib(),
        "peak_train_mib": peak_train,
        "rss_after_train_mib": rss_after_train,
        "reference_mib": reference_bytes / 2**20,
        "trained_fraction": sparse.trained_fraction,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "seconds_per_step": seconds / steps,
    }


def run_speed(density: float, batch_size: int, repeats: int = 7) -> dict:
    """Reference forward of a true copy against the shared reference, interleaved in one process (same load).

    One thread: with two threads on a shared 2-core machine, a descheduled OpenMP thread stalls the other and
    single forwards vary tenfold."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from sparse_rl.discovery import random_mask
    from sparse_rl.models import smollm2_checkpoint
    from sparse_rl.reference import SharedReference

    torch.set_num_threads(1)
    policy = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    shared = SharedReference(policy, random_mask(policy, density, seed=0))
    reference_copy = copy.deepcopy(policy).eval()
    ids = torch.randint(0, policy.config.vocab_size, (2 * batch_size, 64), generator=torch.Generator().manual_seed(0))
    timings = {"copy": [], "shared": [], "swap": []}
    for _ in range(repeats + 1):  # the first round pages the weights in and is dropped
        begin = time.perf_counter()
        with torch.no_grad():
            expected = reference_copy(input_ids=ids).logits
        timings["copy"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        logits = shared(input_ids=ids).logits
        timings["shared"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        with shared.swapped():
            pass
        timings["swap"].append(time.perf_counter() - begin)
        if not torch.equal(logits, expected):
            raise AssertionError("shared reference logits differ from the copy's")
    return {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in timings.items()}


def _with_range(result: dict, key: str) -> str:
    low, high = result[key + "_range"]
    return f"{result[key]:.0f} ({low:.0f}-{high:.0f})"


def _median_run(runs: list[dict]) -> dict:
    """Median of each numeric field over repeated processes, plus the range of the peaks."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            merged[key] = statistics.median(r[key] for r in runs)
    for key in ("rss_after_train_mib", "peak_train_mib", "peak_process_mib"):
        if key in merged and merged[key] is not None:
            merged[key + "_range"] = (min(r[key] for r in runs), max(r[key] for r in runs))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=MODES + ("speed",))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="processes per mode; the table shows the median")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child == "speed":
        emit_result(run_speed(args.density, args.batch_size))
        return
    if args.child:
        emit_result(measure(args.child, args.steps, args.density, args.batch_size))
        return

    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for mode in MODES + ("speed",):
            if mode == "speed" and repeat:
                continue
            command = child_command(__file__, "--child", mode, "--steps", args.steps, "--density", args.density,
                                    "--batch-size", args.batch_size)
            # threads=None: the children pin their own torch threads (2 for training, 1 for the speed run)
            runs.setdefault(mode, []).append(run_child(command, threads=None))
            print(f"{mode}: {runs[mode][-1]}", flush=True)
    results = {mode: _median_run(r) for mode, r in runs.items()}

    copy = results["copy"]
    lines = [
        "# Reference model memory: TRL's copy vs sparse_rl's shared reference",
        "",
        f"DPO on SmolLM2-135M-Instruct (fp32, CPU), {args.steps} steps, batch {args.batch_size} pairs, "
        f"max_length 64, random subnetwork at density {args.density} trained with MaskedAdamW in every mode; "
        f"median of {args.repeats} processes per mode. "
        "Peak RSS per process (`resource.getrusage`), each mode in its own process; the training-phase peak resets "
        "VmHWM through `/proc/self/clear_refs` right before `trainer.train()` (after `gc.collect()` and glibc "
        "`malloc_trim(0)`, so set-up garbage is not counted).",
        "",
        "| reference | reference MiB | RSS after train MiB (range) | peak during train MiB (range) "
        "| peak of process MiB (range) | process peak vs copy | losses |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for mode in MODES:
        r = results[mode]
        train_peak = "n/a" if r["peak_train_mib"] is None else _with_range(r, "peak_train_mib")
        lines.append(
            f"| {mode} | {r['reference_mib']:.1f} | {_with_range(r, 'rss_after_train_mib')} | {train_peak} | "
            f"{_with_range(r, 'peak_process_mib')} | "
            f"{r['peak_process_mib'] / copy['peak_process_mib']:.2f}x | "
            f"{', '.join(f'{x:.6f}' for x in r['losses'])} |"
        )
    speed = results["speed"]
    lines += [
        "",
        f"Reference forward time, {2 * args.batch_size} sequences of 64 tokens, 1 thread, median of 7 interleaved "
        "runs in one process (identical logits checked each run):",
        "",
        "| true copy ms* | shared reference ms* | shared / copy | of which swap in+out ms* |",
        "|---:|---:|---:|---:|",
        f"| {1000 * speed['copy']:.0f} | {1000 * speed['shared']:.0f} | {speed['shared'] / speed['copy']:.2f}x | "
        f"{1000 * speed['swap']:.0f} |",
    ]
    lines += [
        "",
        "Weights loaded from safetensors are memory-mapped and only become resident when first read, so RSS before "
        "training is not comparable between modes; after training every weight is resident. \"RSS after train\" is "
        "the live memory once the steps are done (after `gc.collect()` + `malloc_trim(0)`); the peaks add the "
        "transient allocations of a step, whose placement by the allocator varies. The reference column is the full "
        "copy's parameter bytes, or the shared reference's stored values + int32 indices + one swap's scratch.",
        "*Timings were taken on a 2-core machine shared with other jobs; treat them as indicative only.",
        "",
        f"Reproduce: `python benchmarks/bench_reference_memory.py --steps {args.steps} --density {args.density} "
        f"--batch-size {args.batch_size} --repeats {args.repeats}`",
        "",
    ]
    write_result("\n".join(lines), RESULTS, write=not args.no_write)


if __name__ == "__main__":
    main()
