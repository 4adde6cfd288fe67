"""The five experiments of the research reproduction and the runs they share (see ``reproduce_research.py`` for the
run plan). ``Research`` names each run's spec, submits the runs to the process pool, waits for the ones an
experiment needs, analyses their checkpoints with ``sparse_rl.analysis`` and writes ``expN.md``, ``expN.json``, CSVs
and figures as soon as that experiment finishes."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from _common import write_csv

from .plots import plot_growth, plot_magnitude, plot_rewards
from .pool import RunPool
from .runs import Plan, evaluate, matched_top_k, task_rows
from .summary import fmt, pct, write_summary

DEFAULT_COMMAND = "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_research.py"
PAPER = {
    "changed": "5-30% of parameters updated (bf16 checkpoints)",
    "rank": ">99% of full rank",
    "spread": "updates spread over nearly all matrices",
    "overlap": "well above chance",
    "subnetwork": "subnetwork-only training recovers full finetuning (final params close)",
    "entropy": "top-20% entropy tokens match or beat all tokens",
}


class Research:
    """The experiments of one plan: runs and checkpoints under ``work``, tables and figures in ``results``, the
    summary page in ``<results>.md`` (``command`` is the line it gives to reproduce them)."""

    def __init__(self, plan: Plan, work: Path, results: Path, pool: RunPool, command: str | None = None):
        self.plan, self.work, self.results, self.pool = plan, work, results, pool
        self.command = command or f"{DEFAULT_COMMAND} --mode {plan.mode} --experiments 1,3,2,4,5"
        # experiments 2, 4 and 5 train for `compare` steps and compare with full finetuning at that step (its
        # middle checkpoint, which has a held-out evaluation), so they can start while full finetuning goes on
        self.compare = plan.eval_at[0]
        self.base_dir = work / "base-bf16"
        work.mkdir(parents=True, exist_ok=True)
        results.mkdir(parents=True, exist_ok=True)

    def run_all(self, experiments: list[int]) -> None:
        """Prepare the base, submit every run the chosen experiments need (up to the pool's ``parallel`` at once),
        then run the experiments in the order given: each waits for its own runs and analyses them while the other
        runs keep training."""
        started = time.perf_counter()
        base_reward = self.prepare()
        self.write_summary()
        self.pool.submit(self.full_spec(0))
        if 3 in experiments:
            self.pool.submit(self.full_spec(1))
        if 4 in experiments:  # needs no mask: uses the slots while full-s0 reaches the comparison step
            self.pool.submit(self.entropy_spec())
        if {2, 5} & set(experiments):
            self.masks()  # waits for full-s0's checkpoint at the comparison step
            if 2 in experiments:
                self.pool.submit(self.subnetwork_spec("diff"), self.subnetwork_spec("random"), self.probe_spec(),
                                 self.subnetwork_spec("magnitude"))
                self.pool.submit_after(self.probe_spec(), self.subnetwork_spec("probe"))
            if 5 in experiments:
                self.pool.submit(self.lora_spec())
        for number in experiments:
            t0 = time.perf_counter()
            print(f"\n=== experiment {number} ===", flush=True)
            if number in (1, 2, 4, 5):
                getattr(self, f"experiment_{number}")(base_reward)
            else:
                self.experiment_3()
            print(f"=== experiment {number} done in {time.perf_counter() - t0:.0f}s "
                  f"(total {time.perf_counter() - started:.0f}s) ===", flush=True)

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

    def checkpoint(self, name: str, step: int | None = None) -> Path:
        return self.work / name / f"step{step or self.plan.steps}"

    def full_spec(self, seed: int) -> dict:
        return self.spec(f"full-s{seed}", "full", seed, save_bf16=seed == 0)

    def full_run(self, seed: int) -> dict:
        return self.pool.run(self.full_spec(seed))

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
        return self.pool.done(self.full_spec(0)) or (log.exists() and f"[full-s0] step {step}:" in log.read_text())

    def masks(self) -> dict:
        """Experiment 2's masks, all with the per-tensor counts of full finetuning's bf16 diff at step ``compare``
        (the paper's mask: the diff of the run the subnetwork is compared with). The probe mask is trained by a
        submitted run; this returns once the diff, random and magnitude masks are saved."""
        from sparse_rl.discovery import WeightSource, diff_mask

        self.pool.wait(self.full_spec(0), until=lambda: self.s0_reached(self.compare))
        folder = self.work / "masks"
        info_path = folder / "masks.json"
        if info_path.exists():
            return json.loads(info_path.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        reference = self.checkpoint("full-s0", self.compare)
        natural = diff_mask(self.base_dir, reference, compare_dtype=torch.bfloat16)
        info = {"natural_density": natural.density, "step": self.compare}
        if natural.density > self.plan.max_mask_density:
            diff = diff_mask(self.base_dir, reference, density=self.plan.max_mask_density,  # as the committed
                             compare_dtype=torch.bfloat16, fill="rounded", rank_changed="rounded")  # results were cut
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
            self.pool.pump()  # keep the other runs' slots filled during the long analysis
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
        self.pool.pump()
        rank16 = analyze_update(self.base_dir, final, compare_dtype=bf16, include=include).mean_rank_ratio
        rank32 = analyze_update(self.base_dir, final, include=include).mean_rank_ratio
        rank_null = precision_control(self.base_dir, final, include=include, rank=True).null_mean_rank_ratio
        self.pool.pump()
        profile = magnitude_profile(self.base_dir, final)
        out = self.results
        write_csv(out / "exp1_sparsity_by_step.csv", rows)
        write_csv(out / "exp1_magnitude.csv", profile.rows())
        final_reports["bf16"].write_csv(out / "exp1_per_tensor_bf16.csv")
        final_reports["bf16"].plot(out / "exp1_per_layer_bf16.png")
        final_reports["fp32"].plot(out / "exp1_per_layer_fp32_gt1e-5.png")
        plot_growth(rows, out / "exp1_changed_vs_steps.png")
        plot_magnitude(profile, out / "exp1_magnitude.png")
        plot_rewards({"full-s0": run}, base_reward, out / "exp1_reward.png", "Full GRPO finetuning, seed 0")
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
                f"{r['matrix_changed_median']:.1%} / {r['matrix_changed_max']:.1%} | {fmt(r['heldout_reward'])} |")
        lines += [
            "", f"Spread (paper: {PAPER['spread']}): {last['tensors_touched']} of {last['tensors']} tensors changed in "
            "bf16 at the last step; per-layer plot `exp1_per_layer_bf16.png` (fp32 > 1e-5: "
            "`exp1_per_layer_fp32_gt1e-5.png`).", "",
            f"Rank (paper: {PAPER['rank']}), mean rank(Δ)/min(m, n) over {ranked} at step {self.plan.steps}: "
            f"bf16 diff {pct(rank16)}, fp32 diff {pct(rank32)}, precision null {pct(rank_null)}.", "",
            "Relation to weight magnitude (entries binned by |w| decile within each tensor; `exp1_magnitude.png`):", "",
            "| magnitude decile | changed, bf16 | changed, null | changed, fp32 any |", "|---|---|---|---|",
        ]
        exact = profile.exact_share or [None] * profile.bins
        for i in range(profile.bins):
            lines.append(f"| {i + 1} | {profile.rounded_share[i]:.1%} | {profile.null_share[i]:.1%} | "
                         f"{pct(exact[i], 1)} |")
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
            self.pool.pump()
            a, b = self.checkpoint("full-s0", step), self.checkpoint("full-s1", step)
            pc = precision_control(self.base_dir, a, other=b)
            top = mask_overlap(diff_mask(self.base_dir, a, density=0.1), diff_mask(self.base_dir, b, density=0.1))
            rows.append({"step": step, "overlap_bf16": pc.overlap.overlap, "chance_bf16": pc.overlap.chance_overlap,
                         "null_bf16": pc.null_overlap.overlap, "null_excess_share": pc.null_excess_overlap_share,
                         "overlap_fp32_top10": top.overlap, "chance_fp32_top10": top.chance_overlap,
                         "density_s0_bf16": pc.overlap.selected1 / pc.overlap.total,
                         "density_s1_bf16": pc.overlap.density2})
        write_csv(self.results / "exp3_overlap.csv", rows)
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
                f"| {r['chance_bf16']:.3f} | {r['null_bf16']:.3f} | {pct(r['null_excess_share'], 1)} | "
                f"{r['overlap_fp32_top10']:.3f} | {r['chance_fp32_top10']:.3f} |")
        lines.append("")
        self._write("exp3", lines, {"rows": rows})

    def experiment_2(self, base_reward: float) -> None:
        from sparse_rl import SubnetworkMask
        from sparse_rl.analysis import mask_overlap

        full = self.full_run(0)
        info = self.masks()
        info["probe_seconds"] = self.pool.run(self.probe_spec())["probe_seconds"]
        diff = SubnetworkMask.load(self.work / "masks" / "diff.safetensors")
        runs, rows = {"full-s0": _truncate(full, self.compare)}, []
        labels = {"diff": "mask of full FT's bf16 diff (paper)", "probe": f"{self.plan.probe_steps}-batch gradient "
                  "probe", "magnitude": "smallest magnitude", "random": "random"}
        for key in ("diff", "random", "magnitude", "probe"):  # the order they are scheduled in
            name = f"sub-{key}"
            run = self.pool.run(self.subnetwork_spec(key))
            runs[name] = run
            mask = SubnetworkMask.load(self.work / "masks" / f"{key}.safetensors")
            rows.append(self._closeness_row(name, labels[key], run, mask, mask.density,
                                            mask_overlap(mask, diff).overlap))
            self._experiment_2_tables(base_reward, full, rows, info, runs)
        if self.pool.done(self.full_spec(1)):  # how far two full-FT runs are from each other
            runs["full-s1"] = _truncate(json.loads((self.work / "full-s1" / "run.json").read_text()), self.compare)
            rows.append(self._closeness_row("full-s1", "(full finetuning, seed 1: reference spread)",
                                            runs["full-s1"], diff, 1.0, ""))
            self._experiment_2_tables(base_reward, full, rows, info, runs)

    def _closeness_row(self, name: str, label: str, run: dict, mask, density: float, overlap) -> dict:
        """Experiment 2's row for run ``name``: its rewards at step ``compare`` and how close its update (final -
        base) is to full finetuning's at that step, on ``mask``'s entries and on all entries."""
        from sparse_rl.analysis import update_agreement

        checkpoint, full_final = self.checkpoint(name, self.compare), self.checkpoint("full-s0", self.compare)
        on_mask = update_agreement(self.base_dir, checkpoint, full_final, mask)
        overall = update_agreement(self.base_dir, checkpoint, full_final)
        return {"run": name, "mask": label, "density": density, "overlap_with_diff_mask": overlap,
                "reward": run["evals"][str(self.compare)], "train_reward_last_quarter": _train_reward(run, 0.25),
                "rel_error_on_mask": on_mask.relative_error, "cosine_on_mask": on_mask.cosine,
                "bf16_equal_on_mask": on_mask.rounded_equal, "rel_error_all": overall.relative_error,
                "cosine_all": overall.cosine, "median_step_s": statistics.median(run["step_seconds"])}

    def _experiment_2_tables(self, base_reward, full, rows, info, runs) -> None:
        write_csv(self.results / "exp2_subnetworks.csv", rows)
        plot_rewards(runs, base_reward, self.results / "exp2_reward.png", "Subnetwork-only GRPO vs full finetuning")
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
                f"| {r['run']} | {r['mask']} | {fmt(r['overlap_with_diff_mask'])} | {r['reward']:.3f} | "
                f"{r['train_reward_last_quarter']:.3f} | {r['rel_error_on_mask']:.3f} | {r['cosine_on_mask']:.3f} | "
                f"{r['bf16_equal_on_mask']:.1%} | {r['rel_error_all']:.3f} | {r['cosine_all']:.3f} | "
                f"{r['median_step_s']:.2f} |")
        lines += ["", "![reward curves](research/exp2_reward.png)", ""]
        self._write("exp2", lines, {"rows": rows, "masks": info})

    def experiment_4(self, base_reward: float) -> None:
        from sparse_rl.analysis import precision_control

        full = _truncate(self.full_run(0), self.compare)
        ent = self.pool.run(self.entropy_spec())
        rows = []
        for name, run in (("full-s0", full), ("entropy-q0.2", ent)):
            pc = precision_control(self.base_dir, self.checkpoint(name, self.compare))
            rows.append({"run": name, "tokens": "all" if name == "full-s0" else "top-20% entropy",
                         **self._reward_columns(run),
                         "train_seconds": sum(run["step_seconds"]), "changed_bf16": 1 - pc.sparsity_rounded,
                         "changed_null": 1 - pc.sparsity_null})
        write_csv(self.results / "exp4_entropy.csv", rows)
        plot_rewards({"full-s0 (all tokens)": full, "entropy-q0.2": ent}, base_reward,
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
        lora = self.pool.run(spec)
        runs = {"full-s0": full, f"lora-r{rank}": lora}
        rows = [{"run": "full-s0", "trainable": _total_params(self.base_dir), "lr": self.plan.learning_rate,
                 **self._reward_columns(full)}]
        for name in ("sub-diff", "sub-random"):
            path = self.work / name / "run.json"
            if self.pool.done(self.subnetwork_spec(name.removeprefix("sub-"))):
                runs[name] = json.loads(path.read_text())
                rows.append({"run": name, "trainable": runs[name]["trainable"], "lr": self.plan.learning_rate,
                             **self._reward_columns(runs[name])})
        rows.append({"run": f"lora-r{rank}", "trainable": lora["trainable"], "lr": spec["learning_rate"],
                     **self._reward_columns(lora)})
        write_csv(self.results / "exp5_lora.csv", rows)
        plot_rewards(runs, base_reward, self.results / "exp5_reward.png", "LoRA at the subnetwork's parameter count")
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

    def _reward_columns(self, run: dict) -> dict:
        """A run's held-out reward at step ``compare``, its last-quarter training reward and median step time."""
        return {"reward": run["evals"][str(self.compare)], "train_reward_last_quarter": _train_reward(run, 0.25),
                "median_step_s": statistics.median(run["step_seconds"])}

    # ---- outputs
    def _write(self, key: str, lines: list[str], data: dict) -> None:
        (self.results / f"{key}.md").write_text("\n".join(lines))
        (self.results / f"{key}.json").write_text(json.dumps(data, indent=1, default=str))
        self.write_summary()
        print("\n".join(lines), flush=True)

    def write_summary(self) -> None:
        write_summary(self.results, self.plan, self.compare, self.command)


def _truncate(run: dict, step: int) -> dict:
    """A run's record up to ``step`` (to compare a longer run with shorter ones at equal length)."""
    return {**run, "log": [e for e in run["log"] if e.get("step", 0) <= step and "reward" in e],
            "evals": {k: v for k, v in run["evals"].items() if int(k) <= step},
            "step_seconds": run["step_seconds"][:step]}


def _train_reward(run: dict, tail: float, upto: int | None = None) -> float:
    rewards = [e["reward"] for e in run["log"] if "reward" in e and (upto is None or e.get("step", 0) <= upto)]
    keep = max(1, round(len(rewards) * tail))
    return sum(rewards[-keep:]) / keep


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
