"""One GRPO run of the experiment -> one JSON file.

A run is fully described by a :class:`RunConfig` (task, method, density, mask strategy, LoRA rank, entropy quantile,
learning rate, seed and the protocol's sizes). Its file name is derived from the config (:meth:`RunConfig.run_id`),
so a sweep resumes by skipping the configs whose file exists. The trainer is the demo's
(``sparse_rl.demo.build_demo_trainer``); sparse runs attach ``sparse_rl.sparsify``, LoRA runs pass TRL a
``peft_config``, entropy runs set GRPO's own ``top_entropy_quantile``.

The JSON holds the exact config and command, the held-out evaluation at every ``eval_every`` steps with the count of
correct samples per held-out prompt (so intervals can resample prompts), the per-step training reward and step
time, the peak resident memory while training, the optimizer-state bytes and the trained entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from sparse_rl.discovery import FILLS, RANKS

METHODS = ("base", "full", "sparse", "lora")
MASKS = ("gradient", "fisher", "random", "magnitude", "posthoc")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run. ``method="base"`` evaluates the untrained model (step 0 of every curve of the task)."""

    task: str = "addition"
    method: str = "full"
    learning_rate: float = 0.0
    seed: int = 0
    density: float | None = None  # sparse: share of every tensor's entries
    mask: str | None = None  # sparse: one of MASKS
    lora_rank: int | None = None
    entropy_quantile: float = 1.0  # < 1: loss gradient on the top-q entropy completion tokens (GRPO's own option)
    mask_from_task: str | None = None  # post-hoc: the mask comes from this task's full run (None: the run's own task)
    # post-hoc: diff_mask's fill where bf16 left fewer entries changed than the density ("rounded": lowest index, as
    # every run before stage F; "moved": the unchanged entries that moved most before rounding)
    posthoc_fill: str = "rounded"
    # post-hoc: how diff_mask orders the changed entries a density keeps only some of ("rounded": by the rounded |Δ|,
    # bf16's ties by lowest index, as every run before stage S; "moved": by the move before rounding)
    posthoc_rank: str = "rounded"
    # protocol (the same for every run of a sweep; part of the file name through a hash)
    steps: int = 60
    prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 4
    probe_steps: int = 4
    eval_pairs: int = 256
    eval_samples: int = 4
    eval_every: int = 20
    eval_seed: int = 1234

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "sparse" and (self.mask not in MASKS or self.density is None):
            raise ValueError(f"a sparse run needs mask in {MASKS} and a density, got {self.mask!r}, {self.density!r}")
        if self.method == "lora" and not self.lora_rank:
            raise ValueError("a LoRA run needs lora_rank")
        if self.mask_from_task is not None and (self.mask != "posthoc" or self.mask_from_task == self.task):
            raise ValueError(f"mask_from_task names another task whose full run cuts a post-hoc mask, got "
                             f"{self.mask_from_task!r} for a {self.mask!r} mask on {self.task!r}")
        if self.posthoc_fill not in FILLS or (self.posthoc_fill != "rounded" and self.mask != "posthoc"):
            raise ValueError(f"posthoc_fill is one of {FILLS} and only for a post-hoc mask, got "
                             f"{self.posthoc_fill!r} for a {self.mask!r} mask")
        if self.posthoc_rank not in RANKS or (self.posthoc_rank != "rounded" and self.mask != "posthoc"):
            raise ValueError(f"posthoc_rank is one of {RANKS} and only for a post-hoc mask, got "
                             f"{self.posthoc_rank!r} for a {self.mask!r} mask")
        if self.method != "base" and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def row(self) -> str:
        """The row of the results table this run belongs to (everything but lr and seed)."""
        if self.method == "base":
            name = "base"
        elif self.method == "full":
            name = "full"
        elif self.method == "lora":
            name = f"lora-r{self.lora_rank}"
        else:
            name = f"sparse-{self.mask}-{self.density:g}"
            if self.mask_from_task is not None:
                name += f"-from-{self.mask_from_task}"
            if self.posthoc_fill != "rounded":
                name += f"-fill-{self.posthoc_fill}"
            if self.posthoc_rank != "rounded":
                name += f"-rank-{self.posthoc_rank}"
        return name if self.entropy_quantile == 1.0 else f"{name}-entropy{self.entropy_quantile:g}"

    def protocol(self) -> dict:
        fields = ("steps", "prompts_per_step", "num_generations", "max_completion_length", "probe_steps",
                  "eval_pairs", "eval_samples", "eval_every", "eval_seed")
        values = {k: getattr(self, k) for k in fields}
        if self.method == "base":  # the base model's evaluation depends on the evaluation settings only
            values = {k: v for k, v in values.items() if k.startswith("eval_") and k != "eval_every"}
        return values

    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()[:6]
        if self.method == "base":
            return f"{self.task}__base__{digest}"
        return f"{self.task}__{self.row}__lr{self.learning_rate:g}__s{self.seed}__{digest}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def result_path(runs_dir: Path, config: RunConfig) -> Path:
    return Path(runs_dir) / f"{config.run_id()}.json"


def load_result(runs_dir: Path, config: RunConfig) -> dict | None:
    """The finished run's record, or None (also when the file holds another config: an id collision)."""
    path = result_path(runs_dir, config)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    try:  # compared as configs, so a record written before a field with a default existed still matches
        same = RunConfig(**record["config"]) == config
    except (TypeError, ValueError):  # a field this code does not know, or a config it refuses
        same = False
    return record if same else None


def weights_path(weights_dir: Path, config: RunConfig) -> Path:
    """Where a full-finetuning run leaves its final weights (as trained, fp32), the source of post-hoc masks."""
    return Path(weights_dir) / f"{config.run_id()}.safetensors"


def running_pid(work: Path, run_id: str) -> int | None:
    """The pid of a live worker training ``run_id`` (its pid file under ``work/jobs`` names a process whose command
    line holds the run's id), or None."""
    pid_file = Path(work) / "jobs" / f"{run_id}.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        alive = run_id in Path(f"/proc/{pid}/cmdline").read_text()
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return None
    return pid if alive and state != "Z" else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str | None:
    """The git commit the benchmark code runs from, ``+dirty`` with uncommitted changes to the code it runs (result
    JSONs do not count), None outside a checkout: masks change between commits, so a run records its code."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                "../choose_by.py", "../_common.py", "../../sparse_rl", "../../kernels"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------- the run
def run_one(config: RunConfig, runs_dir: Path, *, model_dir: str | os.PathLike | None = None,
            work_dir: Path | None = None, weights_dir: Path | None = None, posthoc_source: Path | None = None,
            command: str = "") -> dict:
    """Train (or, for ``method="base"``, only evaluate) one run and write its JSON atomically to ``runs_dir``.

    ``posthoc_source`` is the final-weights file of the full-finetuning run whose bf16 diff, cut to ``density`` of
    every tensor, is the post-hoc mask (``mask="posthoc"``). ``weights_dir`` receives a full run's final weights.
    """
    from _common import peak_rss_mib, reset_peak, status_mib
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from choosing.evaluate import held_out_correct
    from choosing.tasks import make_task

    started = time.time()
    runs_dir = Path(runs_dir)
    work_dir = Path(work_dir or runs_dir.parent / "work")
    if model_dir is None:
        from sparse_rl.models import smollm2_checkpoint

        model_dir = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = make_task(config.task, config.steps, config.prompts_per_step, config.eval_pairs)
    record: dict = {"id": config.run_id(), "row": config.row, "config": config.to_dict(), "command": command,
                    "code": code_version(), "model": str(model_dir), "cpu": cpu_name(),
                    "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0],
                    "evals": [], "step_seconds": [], "train_reward": []}
    previous = load_result(runs_dir, config)
    if previous is not None:  # rerun to rewrite lost final weights: keep what the first run found, to compare
        record["previous_run"] = {k: previous.get(k) for k in ("final_reward", "finished", "cpu", "command")}

    def evaluate(evaluated_model, step: int) -> None:
        t0 = time.perf_counter()
        correct = held_out_correct(evaluated_model, tokenizer, task.held_out, config.eval_samples,
                                   config.max_completion_length, config.eval_seed)
        reward = sum(correct) / (len(correct) * config.eval_samples)
        record["evals"].append({"step": step, "reward": reward, "correct": correct,
                                "seconds": time.perf_counter() - t0})
        print(f"[{config.run_id()}] step {step}: held-out reward {reward:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)

    if config.method == "base":
        evaluate(model, 0)
        return _finish(record, config, runs_dir, started)

    from sparse_rl import sparsify
    from sparse_rl.demo import DemoConfig, build_demo_trainer
    from sparse_rl.optim import unwrap_optimizer

    holder: dict = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.start)
            if state.global_step % config.eval_every == 0 or state.global_step == config.steps:
                # training's peak since the last evaluation; the peak is reset after each evaluation so its
                # buffers (cache, logits of every sample) never count as training memory
                record["peak_rss_train_mib"] = max(record.get("peak_rss_train_mib", 0.0), status_mib("VmHWM"))
                evaluate(holder["trainer"].model, state.global_step)
                reset_peak()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                record["train_reward"].append(logs["reward"])

    demo = DemoConfig(steps=config.steps, num_generations=config.num_generations,
                      prompts_per_step=config.prompts_per_step, max_completion_length=config.max_completion_length,
                      learning_rate=config.learning_rate, seed=config.seed,
                      output_dir=str(work_dir / config.run_id()))
    peft_config = None
    if config.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = build_demo_trainer(demo, model, tokenizer, task.train_rows, reward_funcs=task.reward,
                                 peft_config=peft_config, callbacks=[Recorder()], logging_steps=1,
                                 disable_tqdm=True, top_entropy_quantile=config.entropy_quantile)
    holder["trainer"] = trainer
    setup = time.perf_counter()
    sparse = None
    if config.method == "sparse":
        sparse = sparsify(trainer, _sparse_config(config, trainer, model_dir, posthoc_source))
        record["trained_entries"] = sparse.mask.num_selected
    else:
        record["trained_entries"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record["total_entries"] = sum(p.numel() for p in model.parameters())
    record["setup_seconds"] = time.perf_counter() - setup
    train_start = time.perf_counter()
    trainer.train()
    record["train_seconds"] = time.perf_counter() - train_start
    optimizer = unwrap_optimizer(trainer.optimizer)
    if hasattr(optimizer, "state_bytes"):
        record["optimizer_state_bytes"] = optimizer.state_bytes()
    else:
        record["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                                              for k, v in state.items() if torch.is_tensor(v) and k != "step")
    record["optimizer"] = type(optimizer).__name__
    if config.method == "full" and config.entropy_quantile == 1.0 and weights_dir is not None:
        from safetensors.torch import save_file

        path = weights_path(weights_dir, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        # as trained (fp32): a post-hoc mask's "moved" fill ranks by the move before bf16 rounding
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        record["final_weights"] = str(path)
    # clearing the peak (reset_peak) also resets what getrusage reports, so the process peak is the larger of both
    record["peak_rss_mib"] = max(peak_rss_mib(), record.get("peak_rss_train_mib", 0.0))
    return _finish(record, config, runs_dir, started)


def _sparse_config(config: RunConfig, trainer, model_dir, posthoc_source) -> object:
    from sparse_rl import SparseConfig
    from sparse_rl.discovery import ProbeOptions, diff_mask, magnitude_mask

    common = dict(density=config.density, compact_grads=True, seed=config.seed)
    if config.mask in ("gradient", "fisher"):
        return SparseConfig(discovery="gradient", probe=ProbeOptions(steps=config.probe_steps, score=config.mask),
                            **common)
    if config.mask == "random":
        return SparseConfig(discovery="random", **common)
    if config.mask == "magnitude":  # smallest |w| first: where a bf16 checkpoint diff shows updates first
        return SparseConfig(mask=magnitude_mask(trainer.model, config.density, largest=False), **common)
    if posthoc_source is None or not Path(posthoc_source).exists():
        raise ValueError(f"a post-hoc mask needs the full run's final weights, got {posthoc_source}")
    if "moved" in (config.posthoc_fill, config.posthoc_rank):
        from sparse_rl.discovery import WeightSource

        with WeightSource(posthoc_source) as source:
            if any(source.dtype(n) == torch.bfloat16 for n in source.names):
                raise ValueError(f"{posthoc_source} stores bf16 (a full run from before its weights were kept in "
                                 "fp32): the moved fill and rank need the move before rounding; delete it to rerun "
                                 "the run")
    mask = diff_mask(model_dir, posthoc_source, density=config.density, compare_dtype=torch.bfloat16,
                     fill=config.posthoc_fill, rank_changed=config.posthoc_rank)
    return SparseConfig(mask=mask, **common)


def _finish(record: dict, config: RunConfig, runs_dir: Path, started: float) -> dict:
    record["final_reward"] = record["evals"][-1]["reward"]
    record["seconds"] = time.time() - started
    record["load_average_end"] = os.getloadavg()[0]
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if record["step_seconds"]:
        ordered = sorted(record["step_seconds"])
        record["median_step_seconds"] = ordered[len(ordered) // 2]
    path = result_path(runs_dir, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record
