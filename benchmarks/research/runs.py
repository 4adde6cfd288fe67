"""One training run of the research reproduction, in its own process: the plan's sizes, the task, the GRPO trainer
on the bf16-rounded base, and the two workers (a training run with checkpoints and held-out evaluations; the cheap
gradient probe that builds a mask). ``reproduce_research.py --worker spec.json`` and ``--probe-worker spec.json``
call them; a run's whole configuration is its ``spec.json``, so a worker needs nothing from the process that
started it."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch

EVAL_SEED = 1234


@dataclasses.dataclass
class Plan:
    """Sizes of one mode. ``steps`` is the same for every run so rewards and updates compare at equal length."""

    mode: str
    steps: int
    checkpoints: tuple[int, ...]
    eval_pairs: int
    eval_repeats: int
    probe_steps: int
    learning_rate: float = 3e-5
    max_mask_density: float = 0.3
    lora_lr_scale: float = 10.0
    max_operand: int = 19
    num_generations: int = 8
    prompts_per_step: int = 2
    max_completion_length: int = 6
    rank_include: tuple[str, ...] | None = None  # None: every tensor
    eval_at: tuple[int, ...] = ()  # checkpoints with a held-out evaluation (empty: all of them)

    @classmethod
    def for_mode(cls, mode: str, steps: int | None = None, learning_rate: float | None = None) -> Plan:
        if mode == "quick":
            plan = cls(mode, steps=2, checkpoints=(1, 2), eval_pairs=16, eval_repeats=1, probe_steps=1,
                       rank_include=("model.layers.0.",))
        elif mode == "full":
            plan = cls(mode, steps=20, checkpoints=(), eval_pairs=100, eval_repeats=2, probe_steps=4)
        else:
            raise ValueError(f"--mode must be 'quick' or 'full', got {mode!r}")
        if steps is not None:
            if steps < 1:
                raise ValueError(f"--steps must be >= 1, got {steps}")
            plan.steps = steps
        if learning_rate is not None:
            plan.learning_rate = learning_rate
        if mode == "full" or steps is not None:
            plan.checkpoints = tuple(sorted({max(1, plan.steps // 4), max(1, plan.steps // 2), plan.steps}))
        # held-out evaluation costs about as much as a few training steps: the middle and the end only
        plan.eval_at = tuple(sorted({plan.checkpoints[len(plan.checkpoints) // 2], plan.steps}))
        return plan

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """The plan as a worker reads it back from its ``spec.json`` (JSON turned the tuples into lists)."""
        include = values.get("rank_include")
        return cls(**{**values, "checkpoints": tuple(values["checkpoints"]),
                      "eval_at": tuple(values.get("eval_at", ())),
                      "rank_include": include if include is None else tuple(include)})


# ---------------------------------------------------------------------------------------------- task
def task_rows(plan: Plan) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): held-out addition pairs never appear in training."""
    from sparse_rl.demo import FEW_SHOT

    pairs = [(a, b) for a in range(plan.max_operand + 1) for b in range(plan.max_operand + 1)]
    held_out = random.Random(1).sample(pairs, plan.eval_pairs)
    seen = set(held_out)
    train_pairs = [p for p in pairs if p not in seen]
    rng = random.Random(0)
    train = [rng.choice(train_pairs) for _ in range(plan.steps * plan.prompts_per_step + 64)]

    def rows(selection):
        return [{"prompt": f"{FEW_SHOT}{a} + {b} =", "answer": a + b} for a, b in selection]

    return rows(train), rows(held_out) * plan.eval_repeats


def evaluate(model, tokenizer, eval_rows: list[dict], plan: Plan) -> float:
    """The demo's held-out sampled reward, leaving the training RNG, padding side and train mode as they were."""
    from sparse_rl.demo import sampled_accuracy

    rng, side, training = torch.random.get_rng_state(), tokenizer.padding_side, model.training
    try:
        return sampled_accuracy(model, tokenizer, eval_rows, plan.max_completion_length, seed=EVAL_SEED)
    finally:
        torch.random.set_rng_state(rng)
        tokenizer.padding_side = side
        model.train(training)


# ---------------------------------------------------------------------------------------------- one training run
def build_trainer(plan: Plan, spec: dict, base_dir: Path, run_dir: Path, callbacks=()):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sparse_rl.demo import addition_reward

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_rows, _ = task_rows(plan)
    args = GRPOConfig(
        output_dir=str(run_dir / "trainer"), max_steps=spec.get("max_steps", plan.steps),
        per_device_train_batch_size=plan.num_generations * plan.prompts_per_step,
        num_generations=plan.num_generations, max_completion_length=plan.max_completion_length,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", weight_decay=0.0, temperature=1.0,
        use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=spec["seed"],
        disable_tqdm=True, top_entropy_quantile=spec.get("entropy_quantile", 1.0),
    )
    peft_config = None
    if spec["kind"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args,
                          train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer,
                          peft_config=peft_config, callbacks=list(callbacks))
    return trainer, tokenizer


def run_worker(spec_path: Path) -> None:
    """Train one run (its own process): checkpoints (fp32, optionally bf16), held-out reward at each, step times."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    plan = Plan.from_dict(spec["plan"])
    run_dir, base_dir = Path(spec["run_dir"]), Path(spec["base_dir"])
    _, eval_rows = task_rows(plan)
    record = {"spec": spec, "step_seconds": [], "evals": {}, "load_start": os.getloadavg()[0]}
    holder = {}

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.start)
            step = state.global_step
            if step not in plan.checkpoints:
                return
            model, tokenizer = holder["trainer"].model, holder["tokenizer"]
            if spec["kind"] != "lora" and spec.get("save_checkpoints", True):
                weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
                (run_dir / f"step{step}").mkdir(parents=True, exist_ok=True)
                save_file(weights, str(run_dir / f"step{step}" / "model.safetensors"))
                if spec.get("save_bf16"):
                    (run_dir / f"step{step}-bf16").mkdir(parents=True, exist_ok=True)
                    save_file({n: w.to(torch.bfloat16) for n, w in weights.items()},
                              str(run_dir / f"step{step}-bf16" / "model.safetensors"))
            if step not in (plan.eval_at or plan.checkpoints):
                return
            record["evals"][str(step)] = evaluate(model, tokenizer, eval_rows, plan)
            print(f"[{spec['name']}] step {step}: held-out reward {record['evals'][str(step)]:.3f}", flush=True)

    trainer, tokenizer = build_trainer(plan, spec, base_dir, run_dir, callbacks=[Recorder()])
    holder.update(trainer=trainer, tokenizer=tokenizer)
    if spec["kind"] == "subnetwork":
        from sparse_rl import SparseConfig, SubnetworkMask, sparsify

        sparse = sparsify(trainer, SparseConfig(mask=SubnetworkMask.load(spec["mask"])))
        record["mask_selected"] = sparse.mask.num_selected
    record["trainable"] = (record.get("mask_selected")
                           or sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    start = time.perf_counter()
    trainer.train()
    record["train_seconds"] = time.perf_counter() - start
    record["log"] = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in trainer.state.log_history]
    record["load_end"] = os.getloadavg()[0]
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))


def run_probe_worker(spec_path: Path) -> None:
    """Cheap probe mask (own process): accumulated |gradient| of the GRPO loss over a few batches, then the same
    number of entries per tensor as the reference mask."""
    from sparse_rl import SubnetworkMask
    from sparse_rl.discovery import ProbeOptions, accumulate_gradient_scores, probe_trainer_state, trainer_loss_fn

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    plan = Plan.from_dict(spec["plan"])
    run_dir = Path(spec["run_dir"])
    trainer, _ = build_trainer(plan, spec, Path(spec["base_dir"]), run_dir)
    start = time.perf_counter()
    with probe_trainer_state(trainer):
        probe = ProbeOptions(steps=plan.probe_steps)
        scores = accumulate_gradient_scores(trainer.model, trainer_loss_fn(trainer), probe)
    seconds = time.perf_counter() - start
    matched_top_k(scores, SubnetworkMask.load(spec["reference_mask"])).save(spec["mask"])
    (run_dir / "run.json").write_text(json.dumps({"spec": spec, "probe_seconds": seconds}))


def matched_top_k(scores: dict[str, torch.Tensor], reference) -> object:
    """Highest-score entries with exactly as many per tensor as ``reference`` selects (a per-tensor matched
    control: any difference in training is then the choice of entries, not their number or spread)."""
    from sparse_rl import SubnetworkMask

    selections = {}
    for name, ref in reference.items():
        flat = scores[name].reshape(-1).float()
        k = int(ref.sum())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            chosen[torch.topk(flat, k, sorted=False).indices] = True
        selections[name] = chosen.view(ref.shape)
    return SubnetworkMask(selections)


