"""Memory and speed of one training step on SmolLM2-135M-Instruct (fp32, CPU): GRPO and DPO, full finetuning against
bitsandbytes 8-bit AdamW, LoRA and sparse_rl subnetworks.

Every (trainer, configuration) runs in its own process, one torch thread, ``use_cpu=True``: load the model with
``sparse_rl.models.load_smollm2()``, build the TRL trainer, apply the configuration, run one warm-up step and K timed
steps. GRPO is the demo's task (``sparse_rl.demo``: few-shot addition, first-integer reward, the demo's batch and
completion length) with ``beta=0.04`` so that TRL keeps a reference model; DPO uses a fixed 1-digit addition
preference set. Configurations:

- ``full-adamw``: full finetuning, Trainer's default torch AdamW (``adamw_torch_fused``), the 1.00x row;
- ``full-adamw8bit``: full finetuning, ``optim="adamw_bnb_8bit"`` (bitsandbytes blockwise 8-bit AdamW);
- ``lora``: PEFT LoRA on all linear layers, rank chosen so its trainable count is closest to sparse_rl at 10%
  (TRL then gets the reference by disabling the adapter: no reference copy);
- ``sparse-<d>%[-8bit][-shared][-compact]``: ``sparsify(trainer, SparseConfig(density=d, discovery="random",
  state_bits=8|32, shared_reference=True|False, compact_grads=True|False))`` (``-compact`` rows at 10% only).
  Random discovery so that the (optional, one-off) gradient probe does not dominate the set-up; the training step
  is the same whatever chose the mask;
- ``sparse-10%-shared-compact-nocopy``: the same as ``sparse-10%-shared-compact`` but built with
  ``sparse_rl.trl.build_trainer``, so TRL never loads the reference copy that ``shared_reference`` would free.

The checkpoint is memory-mapped, so each row first reads every weight (resident from the start, as after a copy to
a GPU). The last timed step is sampled: RSS every 20 ms from a thread, with the optimizer step marked; its peak is
split into weights, gradients, optimizer state, master copy, reference, mask and hooks, and the rest (activations,
logits, generation caches, allocator slack) over the RSS before the model was loaded, and the timelines are drawn
into ``results/<name>_timeline.png``.

Each child reports peak RSS (``ru_maxrss``), the peak during ``trainer.train()`` (VmHWM reset just before it), RSS
after the model load, once the trainer is ready and at the end (trainer deleted, model kept), optimizer-state bytes,
gradient bytes present at the optimizer step, the reference model's bytes, trainable entries and the median step time
(wall and CPU) of the K timed steps.

    python benchmarks/bench_train_step.py            # full table (30 processes), writes results/train_step.{md,csv}
    python benchmarks/bench_train_step.py --quick    # 4 configurations per trainer, 1 timed step, *_quick.{md,csv}
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from _common import (
    RESULTS_DIR,
    child_command,
    emit_result,
    heap_free_mib,
    load_average,
    peak_rss_mib,
    preference_dataset,
    release_memory,
    reset_peak,
    run_child,
    status_mib,
    write_result,
)

TRAINERS = ("grpo", "dpo")
DENSITIES = (0.05, 0.10, 0.30)
GRPO_BETA = 0.04
DPO_BATCH = 4
LORA_MATCH_DENSITY = 0.10


@dataclass(frozen=True)
class Setup:
    """One row of the table: how the trainer is changed before ``train()``."""

    name: str
    kind: str  # "full" | "lora" | "sparse"
    optim: str = "adamw_torch_fused"
    density: float = 0.0
    state_bits: int = 32
    shared_reference: bool = False
    compact_grads: bool = False
    never_built: bool = False  # sparse_rl.trl.build_trainer: TRL never loads the reference copy


def all_setups() -> dict[str, Setup]:
    setups = [Setup("full-adamw", "full"), Setup("full-adamw8bit", "full", optim="adamw_bnb_8bit"),
              Setup("lora", "lora")]
    for density in DENSITIES:
        for bits in (32, 8):
            for shared in (False, True):
                name = f"sparse-{density:.0%}" + ("-8bit" if bits == 8 else "") + ("-shared" if shared else "")
                setups.append(Setup(name, "sparse", density=density, state_bits=bits, shared_reference=shared))
    for base in ("sparse-10%", "sparse-10%-shared", "sparse-10%-8bit-shared"):
        setup = next(s for s in setups if s.name == base)
        setups.append(Setup(f"{base}-compact", "sparse", density=setup.density, state_bits=setup.state_bits,
                            shared_reference=setup.shared_reference, compact_grads=True))
    setups.append(Setup("sparse-10%-shared-compact-nocopy", "sparse", density=0.10, shared_reference=True,
                        compact_grads=True, never_built=True))
    return {s.name: s for s in setups}


SETUPS = all_setups()
QUICK_SETUPS = ("full-adamw", "full-adamw8bit", "lora", "sparse-10%-8bit-shared")


# ------------------------------------------------------------------------------------------------ child
def _build_grpo(model, tokenizer, setup: Setup, max_steps: int, output_dir: str, peft_config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sparse_rl.demo import DemoConfig, addition_prompts, addition_reward

    demo = DemoConfig()
    rows = addition_prompts(max_steps * demo.prompts_per_step, demo.max_operand, demo.seed)
    args = GRPOConfig(
        output_dir=output_dir, max_steps=max_steps,
        per_device_train_batch_size=demo.num_generations * demo.prompts_per_step,
        num_generations=demo.num_generations, max_completion_length=demo.max_completion_length,
        learning_rate=demo.learning_rate, lr_scheduler_type="constant", weight_decay=0.0, temperature=1.0,
        beta=GRPO_BETA, optim=setup.optim, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=demo.seed, disable_tqdm=True,
    )
    return GRPOTrainer, dict(model=model, reward_funcs=addition_reward, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft_config)


def _build_dpo(model, tokenizer, setup: Setup, max_steps: int, output_dir: str, peft_config):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=DPO_BATCH, learning_rate=1e-5,
        lr_scheduler_type="constant", weight_decay=0.0, max_length=64, optim=setup.optim, use_cpu=True, bf16=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    return DPOTrainer, dict(model=model, args=args, train_dataset=preference_dataset(max_steps * DPO_BATCH),
                            processing_class=tokenizer, peft_config=peft_config)


def lora_config_matching(model, density: float):
    """LoRA on every linear layer (PEFT's ``"all-linear"``: all ``nn.Linear`` but the output head) with the rank whose
    trainable count is closest to a ``density`` subnetwork's; returns ``(LoraConfig, target count)``."""
    import torch
    from peft import LoraConfig

    from sparse_rl.discovery.strategies import selected_count, trainable_parameters

    # what random_mask(model, density) selects, ceil(density * n) entries per tensor, counted without drawing the
    # mask: its scores and top-k would set this row's construction peak (about 0.6 GB here), which LoRA never needs
    target = sum(selected_count(p.numel(), density) for _, p in trainable_parameters(model))
    output_head = model.get_output_embeddings()
    per_rank = sum(m.in_features + m.out_features for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not output_head)
    rank = max(1, round(target / per_rank))
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM"), target


class StepRecorder:
    """Trainer callback timing each step (wall and CPU) and its optimizer step, and counting the gradient bytes
    present right before the optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == state.max_steps - 1:  # the last step is sampled
                    recorder.timeline = RssTimeline()
                    recorder.timeline.start()
                recorder._begin = (time.perf_counter(), time.process_time())

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                compact = [getattr(p, "compact_grad", None) for p in model.parameters()]
                recorder.compact_grad_bytes = max(recorder.compact_grad_bytes, sum(
                    g.numel() * g.element_size() for g in compact if g is not None))
                recorder.grad_bytes = max(recorder.grad_bytes, recorder.compact_grad_bytes + sum(
                    p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None))
                recorder._optimizer_begin = time.perf_counter()
                if recorder.timeline is not None:
                    recorder.timeline.mark("optimizer step")

            def on_optimizer_step(self, args, state, control, **kwargs):
                recorder.optimizer_seconds.append(time.perf_counter() - recorder._optimizer_begin)
                if recorder.timeline is not None:
                    recorder.timeline.mark("optimizer step end")

            def on_step_end(self, args, state, control, **kwargs):
                wall, cpu = recorder._begin
                recorder.step_seconds.append(time.perf_counter() - wall)
                recorder.step_cpu_seconds.append(time.process_time() - cpu)
                if recorder.timeline is not None and not recorder.timeline._stop.is_set():
                    recorder.timeline.stop()

        self.callback = _Callback()
        self.timeline: RssTimeline | None = None
        self.grad_bytes = 0
        self.compact_grad_bytes = 0
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.optimizer_seconds: list[float] = []


def _optimizer_state_bytes(optimizer) -> int:
    from sparse_rl import MaskedAdamW
    from sparse_rl.optim import unwrap_optimizer

    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, MaskedAdamW):
        return inner.state_bytes()
    return sum(v.numel() * v.element_size() for state in inner.state.values() for v in state.values()
               if hasattr(v, "numel"))


def _reference_bytes(trainer) -> int:
    from sparse_rl.reference import SharedReference

    reference = getattr(trainer, "ref_model", None)
    if reference is None:
        return 0
    if isinstance(reference, SharedReference):  # values, and off CPU the int32 positions, which with compact
        compact = trainer.sparse_training.compact_grads  # gradients are the hooks' (counted under "mask and hooks")
        return reference.value_bytes() if compact else reference.extra_bytes()
    return sum(p.numel() * p.element_size() for p in reference.parameters())


def _check_setup_applied(trainer, setup: Setup) -> None:
    """Refuse to report a row whose trainer did not run the configuration it is named after."""
    import bitsandbytes
    import torch

    from sparse_rl import MaskedAdamW
    from sparse_rl.optim import unwrap_optimizer
    from sparse_rl.reference import SharedReference

    inner = unwrap_optimizer(trainer.optimizer)
    bnb_8bit = setup.optim == "adamw_bnb_8bit"
    # transformers builds bitsandbytes.optim.AdamW(optim_bits=8) for "adamw_bnb_8bit"
    expected = {"full": bitsandbytes.optim.AdamW if bnb_8bit else torch.optim.AdamW,
                "lora": torch.optim.AdamW, "sparse": MaskedAdamW}[setup.kind]
    if not isinstance(inner, expected):
        raise RuntimeError(f"{setup.name}: the trainer built {type(inner).__name__}, expected {expected.__name__}")
    if bnb_8bit and inner.args.optim_bits != 8:
        raise RuntimeError(f"{setup.name}: bitsandbytes AdamW has optim_bits={inner.args.optim_bits}, expected 8")
    if setup.kind == "sparse" and inner.state_bits != setup.state_bits:
        raise RuntimeError(f"{setup.name}: MaskedAdamW has state_bits={inner.state_bits}, expected {setup.state_bits}")
    if setup.shared_reference != isinstance(getattr(trainer, "ref_model", None), SharedReference):
        raise RuntimeError(f"{setup.name}: shared_reference={setup.shared_reference} but the trainer's reference is "
                           f"{type(trainer.ref_model).__name__}")


def _sparse_config(setup: Setup):
    from sparse_rl import SparseConfig

    return SparseConfig(density=setup.density, discovery="random", state_bits=setup.state_bits,
                        shared_reference=setup.shared_reference, compact_grads=setup.compact_grads)


class RssTimeline:
    """Resident memory of this process sampled by a thread every ``interval`` seconds (``/proc/self/statm``), with
    named marks (optimizer step begin/end) on the same clock."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.heap_free: list[float] = []  # malloc's free bytes inside its heaps at each sample (MiB)
        self.marks: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._start = 0.0

    def _rss(self) -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._start, self._rss()))
            self.heap_free.append(heap_free_mib() or 0.0)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._start = time.perf_counter()
        self._thread.start()

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter() - self._start))

    def stop(self) -> None:
        self.mark("step end")
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._start, self._rss()))
        self.heap_free.append(heap_free_mib() or 0.0)


def _mask_and_hook_bytes(sparse) -> int:
    """The SubnetworkMask's packed selections (1 bit per entry of every listed parameter) and what the gradient hooks
    keep (a bool per entry with dense hooks; with compact gradients the int32 positions of the parameters that hold
    them: on CPU only a tied embedding/output head's, built at its first compact backward)."""
    if sparse is None:
        return 0
    return sparse.mask.nbytes + sparse.restriction.held_bytes


def measure(trainer_name: str, setup: Setup, timed_steps: int, output_dir: str) -> dict:
    import torch
    import trl  # noqa: F401  (imported before the baseline reading, like the libraries every row loads)

    from sparse_rl.models import load_smollm2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    release_memory()
    rss_baseline = status_mib("VmRSS")
    heap_free_baseline = heap_free_mib() or 0.0
    model, tokenizer = load_smollm2()
    with torch.no_grad():  # the checkpoint is memory-mapped: read every weight so it is resident in every row,
        for param in model.parameters():  # as after a copy to the GPU, not only once a row first touches it
            param.sum()
    rss_loaded = status_mib("VmRSS")
    total_parameters = sum(p.numel() for p in model.parameters())
    peft_config, lora_target = None, None
    if setup.kind == "lora":
        peft_config, lora_target = lora_config_matching(model, LORA_MATCH_DENSITY)
    build = _build_grpo if trainer_name == "grpo" else _build_dpo
    trainer_cls, trainer_kwargs = build(model, tokenizer, setup, timed_steps + 1, output_dir, peft_config)
    sparse = None
    if setup.never_built:
        from sparse_rl.trl import build_trainer

        trainer = build_trainer(trainer_cls, _sparse_config(setup), **trainer_kwargs)
        sparse = trainer.sparse_training
    else:
        trainer = trainer_cls(**trainer_kwargs)
        if setup.kind == "sparse":
            from sparse_rl import sparsify

            sparse = sparsify(trainer, _sparse_config(setup))
    selected = sparse.mask.num_selected if sparse is not None else None
    del trainer_kwargs
    recorder = StepRecorder()
    trainer.add_callback(recorder.callback)
    policy = trainer.model
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    reference_bytes = _reference_bytes(trainer)
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    del sparse

    release_memory()
    rss_ready = status_mib("VmRSS")
    peak_ready = status_mib("VmHWM")  # the construction peak: model load, trainer (and TRL's reference copy), sparsify
    reset = reset_peak()
    trainer.train()
    peak_train = status_mib("VmHWM") if reset else None
    mask_bytes = _mask_and_hook_bytes(getattr(trainer, "sparse_training", None))  # after: positions are built lazily
    state_bytes = _optimizer_state_bytes(trainer.optimizer)
    _check_setup_applied(trainer, setup)
    if setup.compact_grads != (recorder.compact_grad_bytes > 0):
        raise RuntimeError(f"{setup.name}: compact_grads={setup.compact_grads} but the optimizer step saw "
                           f"{recorder.compact_grad_bytes} bytes of compact gradients")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    timeline = recorder.timeline
    peak_at = max(range(len(timeline.samples)), key=lambda i: timeline.samples[i][1])
    step_peak = timeline.samples[peak_at][1]
    master_bytes = 0  # fp32 weights: MaskedAdamW keeps no master copy (bf16/fp16 weights would)
    breakdown = {"weights": weight_bytes, "gradients": recorder.grad_bytes, "optimizer state": state_bytes,
                 "master copy": master_bytes, "reference": reference_bytes, "mask and hooks": mask_bytes}
    breakdown = {k: v / MIB for k, v in breakdown.items()}
    breakdown["allocator free"] = timeline.heap_free[peak_at] - heap_free_baseline
    breakdown["rest"] = step_peak - rss_baseline - sum(breakdown.values())
    trainer_args = trainer.args
    del trainer
    release_memory()
    timed = slice(1, None)  # the first step warms up (allocator, numba/bitsandbytes code paths)
    return {
        "trainer": trainer_name, "setup": setup.name, "timed_steps": timed_steps, "threads": torch.get_num_threads(),
        "gradient_checkpointing": bool(trainer_args.gradient_checkpointing),
        "total_parameters": total_parameters,
        "trained_entries": selected if selected is not None else trainable,
        "entries_with_gradient": trainable,
        "lora_rank": peft_config.r if peft_config else None, "lora_target": lora_target,
        "optimizer_state_bytes": state_bytes, "grad_bytes": recorder.grad_bytes, "reference_bytes": reference_bytes,
        "rss_baseline_mib": rss_baseline, "step_peak_mib": step_peak, "breakdown_mib": breakdown,
        "timeline": {"interval": timeline.interval,
                     "samples": [(round(t, 3), round(m, 1)) for t, m in timeline.samples],
                     "marks": [(name, round(t, 3)) for name, t in timeline.marks]},
        "rss_loaded_mib": rss_loaded, "rss_ready_mib": rss_ready, "peak_ready_mib": peak_ready,
        "peak_train_mib": peak_train,
        # ru_maxrss forgets the peak from before reset_peak() (clear_refs resets the high-water mark it reads), so
        # the process's peak is the larger of the construction peak and the peak during train()
        "peak_process_mib": max(peak_ready, peak_train or 0.0, peak_rss_mib()), "rss_end_mib": status_mib("VmRSS"),
        "step_seconds": statistics.median(recorder.step_seconds[timed]),
        "step_cpu_seconds": statistics.median(recorder.step_cpu_seconds[timed]),
        "optimizer_seconds": statistics.median(recorder.optimizer_seconds[timed]),
        "warmup_seconds": recorder.step_seconds[0],
        "losses": losses,
    }


# ------------------------------------------------------------------------------------------------ tables
MIB = 2**20
CSV_FIELDS = ("trainer", "setup", "status", "trained_entries", "entries_with_gradient", "lora_rank",
              "optimizer_state_bytes", "grad_bytes", "reference_bytes", "rss_loaded_mib", "rss_ready_mib",
              "peak_ready_mib",
              "peak_train_mib", "peak_process_mib", "rss_end_mib", "step_seconds", "step_cpu_seconds",
              "optimizer_seconds", "warmup_seconds", "state_grad_vs_full", "peak_process_vs_full",
              "peak_train_vs_full", "rss_end_vs_full", "step_vs_full", "step_cpu_vs_full", "losses")


def _with_ratios(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        full = next((r for r in rows if r["trainer"] == row["trainer"] and r["setup"] == "full-adamw"
                     and r.get("status") == "ok"), None)
        if full is not None and row.get("status") == "ok":
            state_grad = row["optimizer_state_bytes"] + row["grad_bytes"]
            row["state_grad_vs_full"] = state_grad / (full["optimizer_state_bytes"] + full["grad_bytes"])
            for key, ratio in (("peak_process_mib", "peak_process_vs_full"), ("peak_train_mib", "peak_train_vs_full"),
                               ("rss_end_mib", "rss_end_vs_full"), ("step_seconds", "step_vs_full"),
                               ("step_cpu_seconds", "step_cpu_vs_full")):
                if row.get(key) is not None and full.get(key):
                    row[ratio] = row[key] / full[key]
        out.append(row)
    return out


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _with_ratios(rows):
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _ratio(row: dict, key: str) -> str:
    return f" ({row[key]:.2f}x)" if row.get(key) is not None else ""


def to_markdown(rows: list[dict], args, loads: tuple[float, float | None], command: str) -> str:
    from sparse_rl.demo import DemoConfig

    demo = DemoConfig()
    rows = _with_ratios(rows)
    steps = args.steps
    lines = [
        "# Memory and speed of a training step on SmolLM2-135M-Instruct (fp32, CPU)",
        "",
        f"One process per row ({args.jobs} at a time), 1 torch thread, `use_cpu=True`; one warm-up step, then the "
        f"median of {steps} timed step{'s' if steps > 1 else ''}. GRPO: the demo's task (`sparse_rl.demo`, "
        f"few-shot addition, {demo.num_generations * demo.prompts_per_step} completions of up to "
        f"{demo.max_completion_length} tokens per step) with `beta={GRPO_BETA}` (TRL keeps a reference model); "
        f"DPO: {DPO_BATCH} fixed addition preference pairs per step, `max_length=64`. Sparse rows use "
        "`sparsify(trainer, SparseConfig(density=d, discovery=\"random\", state_bits=..., shared_reference=...))` "
        "(`-nocopy`: `build_trainer(cls, SparseConfig(...), **kwargs)`, no reference copy is ever loaded): "
        "random discovery so that the one-off gradient probe does not dominate; the step is the same whatever chose "
        f"the mask. LoRA: all linear layers (not the tied output head), rank chosen to match sparse "
        f"{LORA_MATCH_DENSITY:.0%}'s trained-entry count; TRL disables the adapter for reference forwards. "
        "Otherwise TRL's defaults, including `gradient_checkpointing=True` for both trainers. Every row first reads "
        "every weight of the memory-mapped checkpoint, so the policy is resident from the start.",
        "",
        "Columns: *trained* = entries the optimizer updates (the mask's selected entries for sparse rows); "
        "*state* = optimizer state (`MaskedAdamW.state_bytes()`: moments, 8-bit absmax, selection layout; torch / "
        "bitsandbytes: every state tensor); *grad* = bytes of `.grad` tensors (and of `compact_grad` ones with "
        "`compact_grads=True`) present at the optimizer step; "
        "*ref* = reference model bytes (TRL's copy, or the shared reference's stored values, plus their int32 "
        "indices unless the compact gradient hooks hold the same ones); *ready* = RSS with model and trainer built "
        "(and sparsified), before `train()`; *peak before train* = peak RSS up to then (VmHWM: the construction "
        "peak); *peak train* = peak RSS during `train()` (VmHWM reset before it); *peak process* = the larger of "
        "the two peaks (the whole process: it includes "
        "TRL loading its reference copy at construction, before `shared_reference` frees it; `-nocopy` never loads "
        "it; `ru_maxrss` alone misses the construction peak once VmHWM is reset); "
        "*end* = RSS after `train()` once the "
        "trainer is deleted and `gc.collect()` + `malloc_trim` ran (the policy model is kept): what the process "
        "still holds after training. Ratios are to `full-adamw` of the same trainer.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; 1-minute load average "
        f"{loads[0]:.1f} before" + (f" / {loads[1]:.1f} after" if loads[1] is not None else "")
        + " the run. Wall times vary with the load; CPU time per step (process time) is steadier.",
    ]
    for trainer in TRAINERS:
        mine = [r for r in rows if r["trainer"] == trainer]
        if not mine:
            continue
        lines += [
            "", f"## {trainer.upper()}", "",
            "| setup | trained | state MiB | grad MiB | state + grad MiB | ref MiB | ready MiB | peak before train "
            "MiB | peak train MiB | peak process MiB | end MiB | step s | step CPU s | optimizer step s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            if r.get("status") != "ok":
                lines.append(f"| {r['setup']} | failed: {r.get('error', '?')} |" + " |" * 12)
                continue
            trained = f"{r['trained_entries'] / 1e6:.2f}M ({r['trained_entries'] / r['total_parameters']:.1%})"
            if r.get("lora_rank"):
                trained += f", r={r['lora_rank']}"
            peak_train = "n/a" if r["peak_train_mib"] is None else \
                f"{r['peak_train_mib']:.0f}{_ratio(r, 'peak_train_vs_full')}"
            lines.append(
                f"| {r['setup']} | {trained} | {r['optimizer_state_bytes'] / MIB:.1f} | {r['grad_bytes'] / MIB:.1f} | "
                f"{(r['optimizer_state_bytes'] + r['grad_bytes']) / MIB:.1f}{_ratio(r, 'state_grad_vs_full')} | "
                f"{r['reference_bytes'] / MIB:.1f} | {r['rss_ready_mib']:.0f} | "
                f"{r['peak_ready_mib']:.0f} | {peak_train} | "
                f"{r['peak_process_mib']:.0f}{_ratio(r, 'peak_process_vs_full')} | "
                f"{r['rss_end_mib']:.0f}{_ratio(r, 'rss_end_vs_full')} | "
                f"{r['step_seconds']:.2f}{_ratio(r, 'step_vs_full')} | "
                f"{r['step_cpu_seconds']:.2f}{_ratio(r, 'step_cpu_vs_full')} | {r['optimizer_seconds']:.3f} |")
    lines += breakdown_markdown(rows)
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


BREAKDOWN = ("weights", "gradients", "optimizer state", "master copy", "reference", "mask and hooks", "allocator free",
             "rest")


def breakdown_markdown(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r.get("status") == "ok" and r.get("breakdown_mib")]
    if not rows:
        return []
    lines = [
        "", "## Where the memory of one step goes", "",
        "RSS of the last timed step, sampled every 20 ms by a thread (`/proc/self/statm`), split at its peak: "
        "*weights* = the policy's parameters (LoRA: base + adapters); *gradients* = `.grad` and `compact_grad` bytes "
        "at the optimizer step; *optimizer state* as above; *master copy* = fp32 copies of bf16/fp16 weights (none: "
        "the weights are fp32); *reference* = TRL's copy or the shared reference's values and indices; *mask and "
        "hooks* = the `SubnetworkMask` (packed, 1 bit per entry) plus what the gradient hooks keep (int32 positions of "
        "the selected entries with compact gradients, shared with the shared reference); *allocator free* = bytes "
        "glibc's malloc held free inside its heaps at the peak sample (`mallinfo2().fordblks`, over the same reading "
        "at *base*): freed memory that still counts in RSS once touched (heap fragmentation; an upper bound, as pages "
        "`malloc_trim` returned stay counted until reused); *rest* = the step's peak RSS minus "
        "the process's RSS before the model was loaded (Python, torch, transformers, TRL: *base*) minus all of the "
        "above: activations, logits, generation caches, transient dense gradients (one base matrix's at a time; with "
        "compact gradients a trained embedding/output head's are compact in both the lookup and TRL's fused LM head, "
        "without them the head's, 108 MiB here in fp32, lives through the backward), libraries loaded during "
        "training. "
        "Timelines: `<name>_timeline.png` beside this file.", "",
        "| trainer | setup | base MiB | " + " | ".join(f"{k} MiB" for k in BREAKDOWN) + " | step peak MiB |",
        "|---|---|" + "---:|" * (len(BREAKDOWN) + 2),
    ]
    for r in rows:
        b = r["breakdown_mib"]
        lines.append(f"| {r['trainer'].upper()} | {r['setup']} | {r['rss_baseline_mib']:.0f} | "
                     + " | ".join(f"{b[k]:.0f}" for k in BREAKDOWN) + f" | {r['step_peak_mib']:.0f} |")
    return lines


def plot_timelines(rows: list[dict], path) -> None:
    """Memory over the sampled step, one panel per trainer, one line per row; the optimizer step is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers = [t for t in TRAINERS if any(r["trainer"] == t and r.get("timeline") for r in rows)]
    if not trainers:
        return
    figure, axes = plt.subplots(1, len(trainers), figsize=(7 * len(trainers), 4.5), squeeze=False)
    for axis, trainer in zip(axes[0], trainers):
        for r in rows:
            if r["trainer"] != trainer or not r.get("timeline"):
                continue
            times, rss = zip(*r["timeline"]["samples"])
            (line,) = axis.plot(times, rss, label=r["setup"], linewidth=1.2)
            for name, t in r["timeline"]["marks"]:
                if name == "optimizer step":
                    axis.axvline(t, color=line.get_color(), linestyle=":", linewidth=0.8)
        axis.set_title(f"{trainer.upper()}: RSS over one training step (dotted: optimizer step)")
        axis.set_xlabel("seconds since the step began")
        axis.set_ylabel("RSS (MiB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("TRAINER", "SETUP"), help=argparse.SUPPRESS)
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), help="default: all (or the --quick subset)")
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up step (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 setups per trainer, 1 timed step")
    parser.add_argument("--jobs", type=int, default=1, help="child processes at a time (peak RSS is per process, "
                        "so memory columns are unaffected; step times share the cores)")
    parser.add_argument("--run-dir", default="/tmp/bench_train_step")
    parser.add_argument("--resume", action="store_true", help="keep the rows already measured in results/<name>.json "
                        "(written after every process) and run only the missing or failed ones")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--name", help="stem of the result files (default train_step, --quick train_step_quick)")
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.child:
        trainer_name, setup_name = args.child
        emit_result(measure(trainer_name, SETUPS[setup_name], args.steps, args.run_dir))
        return

    setups = args.setups or (list(QUICK_SETUPS) if args.quick else list(SETUPS))
    if "full-adamw" not in setups:
        print("note: full-adamw is not among the setups, so no ratios can be given")
    stem = args.name or ("train_step_quick" if args.quick else "train_step")
    command = "python benchmarks/bench_train_step.py" + (" --quick" if args.quick else "") + \
        (f" --jobs {args.jobs}" if args.jobs != 1 else "") + \
        (f" --steps {args.steps}" if args.steps != (1 if args.quick else 3) else "") + \
        (f" --trainers {' '.join(args.trainers)}" if args.trainers != list(TRAINERS) else "") + \
        (f" --setups {' '.join(args.setups)}" if args.setups else "") + \
        (f" --name {args.name}" if args.name else "")
    load_before = load_average()
    order = [(t, s) for s in setups for t in args.trainers]
    raw_path = RESULTS_DIR / f"{stem}.json"
    rows: list[dict] = []
    if args.resume and raw_path.exists():
        rows = [r for r in json.loads(raw_path.read_text())
                if r.get("status") == "ok" and (r["trainer"], r["setup"]) in order and r["timed_steps"] == args.steps]
        print(f"resuming: {len(rows)} rows already measured in {raw_path}")
        order = [key for key in order if key not in {(r["trainer"], r["setup"]) for r in rows}]

    def run(trainer_name: str, setup_name: str) -> dict:
        started = time.perf_counter()
        try:
            result = run_child(child_command(__file__, "--child", trainer_name, setup_name, "--steps", args.steps,
                                             "--run-dir", os.path.join(args.run_dir, trainer_name, setup_name)))
            result["status"] = "ok"
        except RuntimeError as error:
            last = str(error).strip().splitlines()[-1]
            result = {"trainer": trainer_name, "setup": setup_name, "status": "failed", "error": last}
        print(f"[{time.perf_counter() - started:.0f}s, load {load_average():.1f}] "
              f"{ {k: v for k, v in result.items() if k != 'losses'} }", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(run, t, s) for t, s in order]):
            rows.append(future.result())
            rows.sort(key=lambda r: (args.trainers.index(r["trainer"]), setups.index(r["setup"])))
            # Rewrite the tables after every process, so an interrupted run keeps what it measured.
            if not args.no_write:
                raw_path.write_text(json.dumps(rows, indent=1) + "\n")
                (RESULTS_DIR / f"{stem}.csv").write_text(to_csv(rows))
                (RESULTS_DIR / f"{stem}.md").write_text(to_markdown(rows, args, (load_before, None), command))
    markdown = to_markdown(rows, args, (load_before, load_average()), command)
    write_result(to_csv(rows), RESULTS_DIR / f"{stem}.csv", write=not args.no_write)
    write_result(markdown, RESULTS_DIR / f"{stem}.md", write=not args.no_write)
    if not args.no_write:
        plot_timelines(rows, RESULTS_DIR / f"{stem}_timeline.png")


if __name__ == "__main__":
    main()
