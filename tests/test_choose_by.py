"""The choose-by experiment's machinery on a tiny model: one run -> one JSON, the sweep skips finished runs, the
held-out sampler agrees with ``generate``."""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import choose_by  # noqa: E402
from choosing.evaluate import sample_completions  # noqa: E402
from choosing.plan import build_plan, matched_lora_rank, trained_count  # noqa: E402
from choosing.report import random_reference  # noqa: E402
from choosing.runs import RunConfig, load_result, result_path, run_one, running_pid, weights_path  # noqa: E402
from choosing.tasks import make_task  # noqa: E402

CLI = ["--steps", "2", "--prompts", "2", "--generations", "4", "--tokens", "3", "--probe-steps", "1",
       "--eval-pairs", "8", "--eval-samples", "2", "--eval-every", "1", "--tasks", "addition"]


def _protocol() -> RunConfig:
    return choose_by.protocol_of(choose_by.parse_args(CLI))


def test_sampler_matches_generate_greedy_on_prompts_of_different_lengths(tiny_model, tiny_tokenizer):
    prompts = ["1 + 2 =", "3 + 4 = 7 1 + 1 =", "1 + 2 = 3 5 + 5 =", "9 =", "1 + 2 = 3 5 + 5 = 1"]
    ours = sample_completions(tiny_model, tiny_tokenizer, prompts, samples=2, max_new_tokens=4, seed=0, greedy=True,
                              batch_prompts=2)
    for prompt, texts in zip(prompts, ours):
        enc = tiny_tokenizer(prompt, return_tensors="pt")
        out = tiny_model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=1)
        assert texts == [tiny_tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)] * 2
    # sampling draws from its own generator: same seed, same completions; the global RNG is untouched
    state = torch.random.get_rng_state()
    a = sample_completions(tiny_model, tiny_tokenizer, prompts, 3, 4, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == sample_completions(tiny_model, tiny_tokenizer, prompts, 3, 4, seed=7)


def test_tasks_hold_out_fixed_prompts_never_trained_on():
    for name in ("addition", "subtraction"):
        task = make_task(name, steps=10, prompts_per_step=4, eval_pairs=64)
        assert task.held_out == make_task(name, steps=30, prompts_per_step=2, eval_pairs=64).held_out
        assert len(task.held_out) == len({r["prompt"] for r in task.held_out}) == 64
        assert not {r["prompt"] for r in task.train_rows} & {r["prompt"] for r in task.held_out}
        assert len(task.train_rows) == 10 * 4 + 64
        assert task.reward([" 7\n", " 8"], answer=[7, 7]) == [1.0, 0.0]
        assert task.reward.__name__ == f"{name}_reward"  # TRL's log key: rewards/<name>/mean
    with pytest.raises(ValueError, match="unknown task"):
        make_task("division", 1, 1, 1)


def test_runs_write_their_json_and_the_sweep_skips_them(tmp_path, tiny_checkpoint):
    runs, work = tmp_path / "results" / "runs", tmp_path / "work"
    protocol = _protocol()
    kw = dict(model_dir=tiny_checkpoint, work_dir=work, weights_dir=work / "weights", command="pytest")
    base = run_one(protocol, runs, **kw)
    assert [e["step"] for e in base["evals"]] == [0] and len(base["evals"][0]["correct"]) == 8

    full_config = protocol.replace(method="full", learning_rate=1e-5)
    full = run_one(full_config, runs, **kw)
    saved = json.loads(result_path(runs, full_config).read_text())
    assert saved["config"] == full_config.to_dict() and saved["command"] == "pytest"
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert saved["code"].removesuffix("+dirty") == head  # which code made the run
    assert [e["step"] for e in saved["evals"]] == [1, 2] and len(saved["step_seconds"]) == 2
    assert all(0 <= c <= 2 for e in saved["evals"] for c in e["correct"]) and len(saved["evals"][1]["correct"]) == 8
    assert saved["final_reward"] == sum(saved["evals"][-1]["correct"]) / 16
    assert full["trained_entries"] == full["total_entries"]
    assert full["optimizer_state_bytes"] == 2 * 4 * full["total_entries"]  # AdamW: two fp32 moments per entry
    assert full["peak_rss_train_mib"] > 0 and full["peak_rss_mib"] >= full["peak_rss_train_mib"] - 1
    assert weights_path(work / "weights", full_config).exists()
    # a rerun (to rewrite lost weights) keeps the first run's result beside its own: same seed, same numbers
    first_weights = load_file(weights_path(work / "weights", full_config))
    weights_path(work / "weights", full_config).unlink()
    again = run_one(full_config, runs, **kw)
    assert again["previous_run"]["final_reward"] == full["final_reward"] == again["final_reward"]
    assert [e["correct"] for e in again["evals"]] == [e["correct"] for e in full["evals"]]
    rewritten = load_file(weights_path(work / "weights", full_config))
    assert rewritten.keys() == first_weights.keys()
    assert all(torch.equal(rewritten[k], first_weights[k]) for k in first_weights)

    sparse_config = protocol.replace(method="sparse", mask="random", density=0.1, learning_rate=3e-5)
    sparse = run_one(sparse_config, runs, **kw)
    assert sparse["trained_entries"] == trained_count(tiny_checkpoint, 0.1) < full["trained_entries"]
    assert sparse["optimizer"] == "MaskedAdamW" and sparse["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    posthoc = run_one(protocol.replace(method="sparse", mask="posthoc", density=0.1, learning_rate=3e-5), runs,
                      posthoc_source=weights_path(work / "weights", full_config), **kw)
    assert posthoc["trained_entries"] == sparse["trained_entries"]
    rank = matched_lora_rank(tiny_checkpoint)
    lora = run_one(protocol.replace(method="lora", lora_rank=rank, learning_rate=3e-4), runs, **kw)
    assert lora["trained_entries"] == rank * sum(
        (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]) * 2

    # resume: the plan lists the finished runs as done, and the sweep would start none of them again
    plan = build_plan(protocol, runs, work / "weights", tiny_checkpoint, ("addition",))
    finished = {p.config.run_id() for p in plan.ready if load_result(runs, p.config)}
    assert {protocol.run_id(), full_config.run_id(), sparse_config.run_id()} <= finished
    args = CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(tmp_path / "results"), "--work", str(work),
                  "--dry-run"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert choose_by.main(args) == 0
    printed = buffer.getvalue()
    assert f"{len(finished)} done" in printed
    for run_id in finished:
        assert run_id not in printed
    # a file holding another config under the same name is not taken as done
    record = json.loads(result_path(runs, full_config).read_text())
    record["config"]["seed"] = 5
    result_path(runs, full_config).write_text(json.dumps(record))
    assert load_result(runs, full_config) is None


def test_run_config_refuses_incomplete_rows():
    with pytest.raises(ValueError, match="needs mask"):
        RunConfig(method="sparse", learning_rate=1e-5)
    with pytest.raises(ValueError, match="lora_rank"):
        RunConfig(method="lora", learning_rate=1e-5)
    with pytest.raises(ValueError, match="learning_rate"):
        RunConfig(method="full")
    a = RunConfig(method="full", learning_rate=1e-5)
    assert a.run_id() != a.replace(steps=61).run_id() != a.replace(seed=1).run_id()
    assert RunConfig(method="base").run_id() == RunConfig(method="base", steps=99).run_id()
    assert math.isclose(a.replace(method="sparse", mask="random", density=0.05).density, 0.05)


def _fake_run(runs: Path, config: RunConfig, correct: list[int], entries: int = 100) -> None:
    """A finished run's JSON with given per-prompt correct counts (what run_one writes, without training)."""
    evals = [{"step": config.steps - 1, "reward": 0.0, "correct": [0] * len(correct)},
             {"step": config.steps, "reward": sum(correct) / (len(correct) * config.eval_samples), "correct": correct}]
    record = {"id": config.run_id(), "row": config.row, "config": config.to_dict(), "cpu": "test", "evals": evals,
              "final_reward": evals[-1]["reward"], "trained_entries": entries, "optimizer_state_bytes": 8 * entries,
              "peak_rss_train_mib": 100.0, "median_step_seconds": 1.0, "seconds": 60.0, "load_average_start": 0.0}
    result_path(runs, config).parent.mkdir(parents=True, exist_ok=True)
    result_path(runs, config).write_text(json.dumps(record))


def _complete_sweeps(runs: Path, protocol: RunConfig, checkpoint, best: list[int], other: list[int]) -> list[dict]:
    """Stage A finished: the four swept rows (full, random 10%, probe 10%, matched LoRA) at their family's lrs, the
    middle lr (first of SWEEPS) scoring ``best`` and the others ``other``, so no sweep widens. Returns the rows."""
    from choosing.plan import SWEEPS

    rows = [dict(method="full"), dict(method="sparse", mask="random", density=0.1),
            dict(method="sparse", mask="gradient", density=0.1),
            dict(method="lora", lora_rank=matched_lora_rank(checkpoint))]
    for row in rows:
        for i, lr in enumerate(SWEEPS[row["method"]]):
            _fake_run(runs, protocol.replace(learning_rate=lr, **row), best if i == 0 else other)
    return rows


def _unfinished(plan, runs: Path, stage: str, mask: str) -> tuple:
    """``plan`` and the (density, lr, seed) of its ``mask`` runs in stages starting with ``stage`` not yet run."""
    return plan, {(c.config.density, c.config.learning_rate, c.config.seed) for c in plan.ready
                  if c.stage.startswith(stage) and c.config.mask == mask and load_result(runs, c.config) is None}


def test_report_aggregates_rows_at_their_best_lr(tmp_path, tiny_checkpoint):
    from choosing.plan import SWEEPS

    results = tmp_path / "choose_by"
    runs = results / "runs"
    protocol = _protocol()
    rank = matched_lora_rank(tiny_checkpoint)
    base = [0] * 4 + [1] * 4  # 8 prompts, 2 samples each: reward 0.25
    full = [2] * 4 + [1] * 4  # 0.75
    _fake_run(runs, protocol, base)
    rows = {"full": dict(method="full"), "random": dict(method="sparse", mask="random", density=0.1),
            "gradient": dict(method="sparse", mask="gradient", density=0.1),
            "lora": dict(method="lora", lora_rank=rank)}
    family = {"full": "full", "random": "sparse", "gradient": "sparse", "lora": "lora"}
    best = {name: SWEEPS[family[name]][0] for name in rows}
    best["full"] = min(SWEEPS["full"])  # at the edge: the sweep widens one point lower, which scores worse
    _fake_run(runs, protocol.replace(method="full", learning_rate=1e-6), [1] * 8)
    for name, kw in rows.items():
        for lr in SWEEPS[family[name]]:  # the first lr of each sweep is the best: the others score 0
            _fake_run(runs, protocol.replace(learning_rate=lr, **kw), full if lr == best[name] else [0] * 8)
        for seed in (1, 2):
            # gradient matches full finetuning; random recovers half of its gain; LoRA recovers none of it
            correct = {"full": full, "gradient": full, "random": [1] * 4 + [1] * 4, "lora": base}[name]
            _fake_run(runs, protocol.replace(learning_rate=best[name], seed=seed, **kw), correct)
    seed_1 = result_path(runs, protocol.replace(method="full", learning_rate=best["full"], seed=1))
    record = json.loads(seed_1.read_text())
    seed_1.write_text(json.dumps({**record, "peak_rss_train_mib": 250.0}))  # one seed peaked higher: the row says so
    # a run of another protocol (more steps) is not part of this report
    _fake_run(runs, protocol.replace(method="full", learning_rate=best["full"], seed=3, steps=9), [0] * 8)
    args = CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(results), "--work", str(tmp_path / "w"),
                  "--report"]
    assert choose_by.main(args) == 0
    text = results.with_suffix(".md").read_text()
    assert results.with_suffix(".png").exists()
    assert f"**{best['full']:g}: 0.750" in text  # the best lr of the sweep, bold
    lines = text.splitlines()
    full_row = next(line for line in lines if line.startswith(f"| full | {best['full']:g} |"))
    assert "| 3 | 0.750 [" in full_row and "| - |" in full_row  # seeds 0-2; its own gain share is not computed
    assert "| 250 |" in full_row  # peak RSS: the highest seed's, not the last one's
    assert not any(line.startswith("| full | 1e-06 |") for line in lines)  # a widened sweep point is not a row
    assert "1e-06: 0.500 [" in text  # but it is in the sweep table
    gradient_row = next(line for line in lines if line.startswith(f"| sparse-gradient-0.1 | {best['gradient']:g} |"))
    assert "| 1.00 [1.00, 1.00] |" in gradient_row  # recovers all of full finetuning's gain
    lora_row = next(line for line in lines if line.startswith(f"| lora-r{rank} | {best['lora']:g} |"))
    assert "| 3 |" in lora_row  # seed 0 (0.75) plus two seeds at the base reward
    assert "Recovering >= 95% of full finetuning's gain with the whole interval: sparse-gradient-0.1" in text
    assert "Full finetuning's held-out reward from step 1 to 2: 0.750 [" in text and "still rising" in text
    # the density axis: a mask's rows at other densities at its own lr, one line per way of choosing the mask
    for seed in (0, 1, 2):
        _fake_run(runs, protocol.replace(learning_rate=best["gradient"], seed=seed, method="sparse", mask="gradient",
                                         density=0.05), base if seed else full)
    assert choose_by.main(args) == 0
    lines = results.with_suffix(".md").read_text().splitlines()
    axis = lines.index("### addition: the density axis (share of full finetuning's gain [95% CI] at each mask's own "
                       "lr)")
    assert lines[axis + 2] == "| mask | 1% | 5% | 10% | 30% |"
    gradient_axis = next(line for line in lines[axis:] if line.startswith("| sparse-gradient |"))
    assert gradient_axis.startswith("| sparse-gradient | - | 0.33 [") and gradient_axis.endswith(
        f"| 1.00 [1.00, 1.00] at {best['gradient']:g} | - |")
    assert next(line for line in lines[axis:] if line.startswith("| sparse-random |")).startswith(
        "| sparse-random | - | - | 0.67 [")  # seed 0 recovers all, seeds 1-2 half


def test_sweep_widens_while_its_best_lr_sits_at_an_edge(tmp_path, tiny_checkpoint):
    from choosing.plan import MAX_WIDENING, SWEEPS, widen

    assert widen([1e-5, 3e-5, 3e-6], 3e-6) == 1e-6 and widen([1e-5, 3e-5, 1e-6], 1e-6) == 3e-7
    assert widen([3e-5, 1e-4, 1e-5], 1e-4) == 3e-4 and widen([1e-4, 3e-4], 3e-4) == 1e-3
    assert widen([1e-5, 3e-5, 3e-6], 1e-5) is None
    runs, protocol = tmp_path / "runs", _protocol()
    lrs = sorted(SWEEPS["full"])

    def plan():
        return build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition",))

    def full_runs(p):
        return [c.config for c in p.ready if c.config.row == "full" and c.config.seed == 0]

    for lr in lrs:  # the smallest lr is best: the sweep goes one grid point lower before any seed 1 runs
        _fake_run(runs, protocol.replace(method="full", learning_rate=lr), [2] * 8 if lr == lrs[0] else [0] * 8)
    p = plan()
    assert [c.learning_rate for c in full_runs(p)][-1] == 1e-6 and ("addition", "full") not in p.best_lr
    assert not [c for c in p.ready if c.config.row == "full" and c.config.seed == 1]
    # the wider lr is worse: the sweep stops and seeds 1, 2 run at the interior best
    _fake_run(runs, protocol.replace(method="full", learning_rate=1e-6), [1] * 8)
    p = plan()
    assert p.best_lr[("addition", "full")] == lrs[0] and p.sweep_lrs[("addition", "full")] == [1e-6] + lrs
    assert {c.config.learning_rate for c in p.ready if c.config.row == "full" and c.config.seed > 0} == {lrs[0]}
    # still improving at every widening: the sweep stops after MAX_WIDENING more points and takes the edge
    for lr in lrs:
        correct = [2] * 6 + [1] * 2 if lr == lrs[0] else [1] * 8
        _fake_run(runs, protocol.replace(method="full", learning_rate=lr), correct)
    _fake_run(runs, protocol.replace(method="full", learning_rate=1e-6), [2] * 7 + [1])
    p = plan()
    assert p.sweep_lrs[("addition", "full")][0] == 3e-7 and ("addition", "full") not in p.best_lr
    _fake_run(runs, protocol.replace(method="full", learning_rate=3e-7), [2] * 8)
    p = plan()
    assert len(p.sweep_lrs[("addition", "full")]) == 3 + MAX_WIDENING and p.best_lr[("addition", "full")] == 3e-7


def test_a_full_run_whose_weights_are_lost_is_rerun_for_its_posthoc_mask(tmp_path, tiny_checkpoint):
    from choosing.plan import SWEEPS

    runs, weights, protocol = tmp_path / "results" / "runs", tmp_path / "work" / "weights", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    full_s0 = protocol.replace(method="full", learning_rate=SWEEPS["full"][0])
    plan = build_plan(protocol, runs, weights, tiny_checkpoint, ("addition",))
    regenerate = [p for p in plan.ready if p.regenerate]
    # planned once though every post-hoc density needs it; seeds 1, 2 never ran: they wait
    assert [p.config.run_id() for p in regenerate] == [full_s0.run_id()]
    assert any("sparse-posthoc-0.1 lr" in w and "seed 0" in w for w in plan.waiting)
    args = CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(tmp_path / "results"),
                  "--work", str(tmp_path / "work"), "--dry-run"]

    def ready_ids():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert choose_by.main(args) == 0
        return [line.split()[-1] for line in buffer.getvalue().splitlines() if line.strip().startswith("ready")]

    ids = ready_ids()
    assert ids.count(full_s0.run_id()) == 1  # planned by every post-hoc density, started once
    weights.mkdir(parents=True)
    weights_path(weights, full_s0).write_bytes(b"")
    assert full_s0.run_id() not in ready_ids()
    def posthoc_s0():
        return [p for p in build_plan(protocol, runs, weights, tiny_checkpoint, ("addition",)).ready
                if p.config.mask == "posthoc" and p.config.seed == 0 and load_result(runs, p.config) is None]

    posthoc = posthoc_s0()
    # the 10% row at the probe's lr and the post-hoc mask's own lr sweep, all from the one full run's weights
    assert {(p.config.density, p.config.learning_rate) for p in posthoc} == {(0.1, lr) for lr in SWEEPS["sparse"]}
    assert all(p.posthoc_source == weights_path(weights, full_s0) for p in posthoc)
    # once every post-hoc run of seed 0 has finished (its sweep's, then the other densities' at the best lr of that
    # sweep), losing the full run's weights again plans no rerun
    while posthoc:
        for p in posthoc:
            _fake_run(runs, p.config, [1] * 8)
        posthoc = posthoc_s0()
    weights_path(weights, full_s0).unlink()
    plan = build_plan(protocol, runs, weights, tiny_checkpoint, ("addition",))
    assert not any(p.regenerate for p in plan.ready)
    assert not any("posthoc" in w and "seed 0" in w for w in plan.waiting)


def test_masks_run_at_their_own_rows_lr_and_the_second_task_takes_the_best_two_plus_random(tmp_path, tiny_checkpoint):
    from choosing.plan import SWEEPS, widen

    runs, protocol = tmp_path / "runs", _protocol()
    rows = {"full": dict(method="full"), "random": dict(method="sparse", mask="random", density=0.1),
            "gradient": dict(method="sparse", mask="gradient", density=0.1),
            "lora": dict(method="lora", lora_rank=matched_lora_rank(tiny_checkpoint))}
    family = {"full": "full", "random": "sparse", "gradient": "sparse", "lora": "lora"}
    best = {name: SWEEPS[family[name]][0] for name in rows}  # the middle lr: no widening
    best["random"] = max(SWEEPS["sparse"])  # random's best sits at the top edge: one more point, which is worse
    for name, row in rows.items():
        for lr in SWEEPS[family[name]] + ((widen(SWEEPS["sparse"], best["random"]),) if name == "random" else ()):
            _fake_run(runs, protocol.replace(learning_rate=lr, **row), [2] * 8 if lr == best[name] else [1] * 8)

    def plan():
        return build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition", "subtraction"))

    p = plan()
    assert p.best_lr[("addition", "sparse-random-0.1")] == best["random"] != best["gradient"]
    lrs = {(c.config.task, c.config.row): c.config.learning_rate for c in p.ready
           if not c.stage.startswith(("M", "N"))}  # the probe's and random's own sweeps at other densities
    for density in (0.01, 0.05, 0.3):  # the density axis keeps each mask's lr: random's is not the probe's
        assert lrs[("addition", f"sparse-random-{density:g}")] == best["random"]
        assert lrs[("addition", f"sparse-gradient-{density:g}")] == best["gradient"]
        assert ("addition", f"sparse-magnitude-{density:g}") not in lrs  # waits for its own sweep (stage H)
    assert not any(c.config.task == "subtraction" and c.config.method == "sparse" for c in p.ready)
    assert any("subtraction sparse 10%" in w for w in p.waiting)
    # every 10% mask with 3 seeds at its lr (seed 0 of gradient and random is their sweep's best run): Fisher and
    # smallest-|w| score best, so the second task runs them plus random, each at its own lr
    score = {"gradient": 0, "fisher": 2, "random": 0, "magnitude": 2, "posthoc": 1}
    for mask, points in score.items():
        lr = best["random"] if mask == "random" else best["gradient"]
        for seed in range(1 if mask in ("gradient", "random") else 0, 3):
            _fake_run(runs, protocol.replace(method="sparse", mask=mask, density=0.1, learning_rate=lr, seed=seed),
                      [points] * 8)
    second = [(c.config.mask, c.config.learning_rate) for c in plan().ready
              if c.config.task == "subtraction" and c.config.method == "sparse"]
    assert set(second) == {("fisher", best["gradient"]), ("magnitude", best["gradient"]), ("random", best["random"])}
    # in the order: the best mask (Fisher wins the tie with smallest |w| by MASKS' order), random, the second best
    assert [mask for mask, _ in second[::3]] == ["fisher", "random", "magnitude"]
    # stage I: seeds 3, 4 only for the probe's and the random 10% mask, each at its own lr
    more = {(c.config.row, c.config.learning_rate, c.config.seed) for c in plan().ready if c.stage == "I more seeds"}
    assert more == {(f"sparse-{mask}-0.1", best[mask], seed) for mask in ("gradient", "random") for seed in (3, 4)}


def test_the_other_masks_get_their_own_lr_sweep_and_their_densities_use_it(tmp_path, tiny_checkpoint):
    """Stage H: Fisher, smallest |w| and post-hoc first run at the probe's lr; their own seed-0 sweep then decides the
    lr of their other densities, and adds seeds 1, 2 at 10% where it differs from the probe's."""
    from choosing.plan import SWEEPS

    runs, protocol = tmp_path / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    probe_lr = SWEEPS["sparse"][0]
    magnitude = dict(method="sparse", mask="magnitude", density=0.1)

    def plan():
        return build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition",))

    def planned(p, **kw):
        return {(c.stage, c.config.density, c.config.learning_rate, c.config.seed) for c in p.ready
                if all(getattr(c.config, k) == v for k, v in kw.items()) and load_result(runs, c.config) is None}

    p = plan()
    assert {(d, lr) for _, d, lr, _ in planned(p, mask="magnitude")} == {(0.1, lr) for lr in SWEEPS["sparse"]}
    assert any("sparse-magnitude-0.01 (F densities): waits for the lr sweep of sparse-magnitude-0.1" in w
               for w in p.waiting)
    # smallest |w| is best at the sweep's top edge: one more grid point, worse, then its own lr is 1e-4
    for lr, points in zip(SWEEPS["sparse"], (1, 2, 0)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **magnitude), [points] * 8)
    assert planned(plan(), mask="magnitude", seed=0) >= {("H lr sweep of the other masks (widened)", 0.1, 3e-4, 0)}
    _fake_run(runs, protocol.replace(learning_rate=3e-4, **magnitude), [0] * 8)
    p = plan()
    assert p.best_lr[("addition", "sparse-magnitude-0.1")] == 1e-4 != probe_lr
    own = planned(p, mask="magnitude", density=0.1, learning_rate=1e-4)
    assert own == {("H other masks at their own lr", 0.1, 1e-4, seed) for seed in (1, 2)}
    assert {(c.config.density, c.config.learning_rate) for c in p.ready if c.config.mask == "magnitude"
            and c.stage == "F densities"} == {(d, 1e-4) for d in (0.01, 0.05, 0.3)}
    # the 10% row at the probe's lr keeps its seeds (stage C), so both rows can be compared
    assert {seed for _, _, _, seed in planned(p, mask="magnitude", density=0.1, learning_rate=probe_lr)} == {1, 2}
    # stage T: at 30% its own seed-0 sweep follows (F's 1e-4 run is its seed 0 there), then seeds 1, 2 at a lower best
    at_30 = dict(magnitude, density=0.3)
    sweep_30 = {(c.config.learning_rate, c.config.seed) for c in p.ready if c.stage.startswith("T lr sweep")
                and c.config.mask == "magnitude"}
    assert sweep_30 == {(3e-5, 0), (1e-5, 0)}
    for lr, points in ((1e-4, 0), (3e-5, 2), (1e-5, 1)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **at_30), [points] * 8)
    p = plan()
    assert p.best_lr[("addition", "sparse-magnitude-0.3")] == 3e-5
    assert planned(p, mask="magnitude", density=0.3) == {("T other masks at 30% at their own lr", 0.3, 3e-5, seed)
                                                         for seed in (1, 2)} | {("F densities", 0.3, 1e-4, seed)
                                                                                for seed in (1, 2)}
    # stage U: the same at 1%, where the best lr here is above the 10% one
    at_1 = dict(magnitude, density=0.01)
    assert {(c.config.learning_rate, c.config.seed) for c in p.ready if c.stage.startswith("U lr sweep")
            and c.config.mask == "magnitude"} == {(3e-5, 0), (1e-5, 0)}
    for lr, points in ((1e-4, 2), (3e-5, 1), (1e-5, 0)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **at_1), [points] * 8)
    p = plan()
    assert planned(p, mask="magnitude", density=0.01, seed=0) == {("U lr sweep of the other masks at 1% (widened)",
                                                                   0.01, 3e-4, 0)}
    _fake_run(runs, protocol.replace(learning_rate=3e-4, **at_1), [3] * 8)
    p = plan()
    assert p.best_lr.get(("addition", "sparse-magnitude-0.01")) is None  # best at the edge again: widened once more
    _fake_run(runs, protocol.replace(learning_rate=1e-3, **at_1), [0] * 8)
    p = plan()
    assert p.best_lr[("addition", "sparse-magnitude-0.01")] == 3e-4
    assert planned(p, mask="magnitude", density=0.01) == {("U other masks at 1% at their own lr", 0.01, 3e-4, seed)
                                                          for seed in (1, 2)} | {("F densities", 0.01, 1e-4, seed)
                                                                                 for seed in (1, 2)}


def test_the_second_task_reruns_the_best_masks_at_their_own_lr(tmp_path, tiny_checkpoint):
    """Stage J: D picked the second task's masks with every other mask at the probe's lr; once H's own-lr rows have 3
    seeds, the two best at their own lr run on the second task (a post-hoc mask from that task's full runs)."""
    from choosing.plan import SWEEPS

    runs, weights, protocol = tmp_path / "runs", tmp_path / "w", _protocol()
    probe_lr = SWEEPS["sparse"][0]
    for row in _complete_sweeps(runs, protocol, tiny_checkpoint, best=[1] * 8, other=[0] * 8):
        for seed in (1, 2):  # seeds 1, 2 at the best lr (stage B)
            _fake_run(runs, protocol.replace(learning_rate=SWEEPS[row["method"]][0], seed=seed, **row), [0] * 8)
    # the other masks: Fisher scores best at the probe's lr (its own too); post-hoc scores nothing there, but its
    # own sweep peaks at 1e-4 (the widened 3e-4 is worse) where it beats every mask
    own = {"fisher": (probe_lr, 1), "magnitude": (probe_lr, 0), "posthoc": (1e-4, 2)}
    for mask, (best, points) in own.items():
        row = dict(method="sparse", mask=mask, density=0.1)
        for lr in SWEEPS["sparse"] + ((3e-4,) if mask == "posthoc" else ()):
            _fake_run(runs, protocol.replace(learning_rate=lr, **row), [points if lr == best else 0] * 8)
        for seed in (1, 2):
            for lr in {probe_lr, best}:
                _fake_run(runs, protocol.replace(learning_rate=lr, seed=seed, **row), [points if lr == best else 0] * 8)

    def second_task(stage=None):
        p = build_plan(protocol, runs, weights, tiny_checkpoint, ("addition", "subtraction"))
        return p, {(c.config.row, c.config.learning_rate, c.regenerate) for c in p.ready
                   if c.config.task == "subtraction" and (stage is None or c.stage.startswith(stage))}

    p, rows = second_task()
    assert p.best_lr[("addition", "sparse-posthoc-0.1")] == 1e-4
    # D (at the probe's lr): Fisher, random, then the probe (ties broken by MASKS' order); post-hoc is not among them
    assert {row for row, lr, _ in rows if row.startswith("sparse") and not row.endswith("-0.01")} == {
        "sparse-fisher-0.1", "sparse-random-0.1", "sparse-gradient-0.1"}  # (1% is stage O's)
    # J: post-hoc at its own lr waits for the second task's full runs; Fisher's own lr is D's, so nothing new
    assert any(f"sparse-posthoc-0.1 lr 0.0001 seed {s} (J second task" in w for w in p.waiting for s in (0, 1, 2))
    for seed in (0, 1, 2):
        _fake_run(runs, protocol.replace(task="subtraction", method="full", learning_rate=SWEEPS["full"][0], seed=seed),
                  [1] * 8)
    _, rows = second_task("J")
    assert rows == {("full", SWEEPS["full"][0], True)}  # finished without weights: rerun once per seed for them
    weights.mkdir()
    for seed in (0, 1, 2):
        full = protocol.replace(task="subtraction", method="full", learning_rate=SWEEPS["full"][0], seed=seed)
        weights_path(weights, full).write_bytes(b"")
    p, rows = second_task("J")
    assert rows == {("sparse-posthoc-0.1", 1e-4, False)}
    posthoc = [c for c in p.ready if c.config.task == "subtraction" and c.config.mask == "posthoc"]
    assert [c.config.seed for c in posthoc] == [0, 1, 2]
    assert all(c.posthoc_source.name.startswith("subtraction__full__") for c in posthoc)


def test_a_posthoc_mask_from_the_other_task_trains_at_posthocs_own_lr(tmp_path, tiny_checkpoint):
    """Stage L: each task trains the post-hoc mask cut from the other task's full run of the same seed, at the
    post-hoc mask's own lr; its rows are named apart, and records written before the field existed still load."""
    from choosing.plan import SWEEPS

    runs, weights, protocol = tmp_path / "runs", tmp_path / "w", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[1] * 8, other=[0] * 8)
    posthoc = dict(method="sparse", mask="posthoc", density=0.1)
    for lr, points in zip(SWEEPS["sparse"] + (3e-4,), (0, 2, 0, 0)):  # post-hoc's own lr is 1e-4 (widened once)
        _fake_run(runs, protocol.replace(learning_rate=lr, **posthoc), [points] * 8)
    full_lr = SWEEPS["full"][0]

    def stage_l():
        p = build_plan(protocol, runs, weights, tiny_checkpoint, ("addition", "subtraction"))
        return p, [c for c in p.ready if c.stage.startswith("L")]

    p, planned = stage_l()
    # no full run has its final weights yet: the one finished (addition's seed 0, from the sweep) is rerun for them
    assert [(c.config.task, c.config.method, c.config.seed, c.regenerate) for c in planned] == [
        ("addition", "full", 0, True)]
    assert any("sparse-posthoc-0.1-from-addition lr 0.0001 seed 0 (L" in w for w in p.waiting)
    weights.mkdir()
    for task in ("addition", "subtraction"):
        for seed in (0, 1, 2):
            full = protocol.replace(task=task, method="full", learning_rate=full_lr, seed=seed)
            _fake_run(runs, full, [1] * 8)
            weights_path(weights, full).write_bytes(b"")
    _, planned = stage_l()
    assert [(c.config.task, c.config.row, c.config.learning_rate, c.config.seed) for c in planned] == [
        (task, f"sparse-posthoc-0.1-from-{source}", 1e-4, seed)
        for task, source in (("subtraction", "addition"), ("addition", "subtraction")) for seed in (0, 1, 2)]
    for c in planned:  # the mask is the other task's full run of the same seed
        other = "addition" if c.config.task == "subtraction" else "subtraction"
        assert c.posthoc_source == weights_path(weights, protocol.replace(
            task=other, method="full", learning_rate=full_lr, seed=c.config.seed))
    own = protocol.replace(task="subtraction", learning_rate=1e-4, **posthoc)
    assert planned[0].config.run_id() != own.run_id()
    assert planned[0].config.to_dict()["mask_from_task"] == "addition"
    # a record written before the field existed (no such key) still matches its config; the other row's does not
    _fake_run(runs, own, [1] * 8)
    record = json.loads(result_path(runs, own).read_text())
    del record["config"]["mask_from_task"]
    result_path(runs, own).write_text(json.dumps(record))
    assert load_result(runs, own) is not None and load_result(runs, planned[0].config) is None
    with pytest.raises(ValueError, match="mask_from_task"):
        own.replace(mask_from_task="subtraction")  # its own task: that is the plain post-hoc row
    with pytest.raises(ValueError, match="mask_from_task"):
        own.replace(mask="random", mask_from_task="addition")
    # stage F: post-hoc at every density, 10% again too, with the moved fill, at its own lr, from the main task
    p = build_plan(protocol, runs, weights, tiny_checkpoint, ("addition", "subtraction"))
    stage_f = [c.config for c in p.ready if c.stage == "F densities" and c.config.mask == "posthoc"]
    assert sorted((c.task, c.density, c.posthoc_fill, c.learning_rate, c.seed) for c in stage_f) == [
        ("addition", density, "moved", 1e-4, seed) for density in (0.01, 0.05, 0.1, 0.3) for seed in (0, 1, 2)]
    # post-hoc's 10% rerun first (the README's open question), then 5% (the default's density), 1%, 30%
    assert [c.density for c in stage_f] == [d for d in (0.1, 0.05, 0.01, 0.3) for _ in (0, 1, 2)]
    # stage S: post-hoc at 1 and 5% ranked by the move before rounding, at its own lr, before F's 1 and 30% rows
    stages = [c.stage for c in p.ready]
    stage_s = [c.config for c in p.ready if c.stage == "S post-hoc ranked by move"]
    assert [(c.task, c.density, c.posthoc_fill, c.posthoc_rank, c.learning_rate, c.seed) for c in stage_s] == [
        ("addition", density, "moved", "moved", 1e-4, seed) for density in (0.01, 0.05) for seed in (0, 1, 2)]
    first_s, last_s = stages.index("S post-hoc ranked by move"), len(stages) - 1 - stages[::-1].index(
        "S post-hoc ranked by move")
    assert {c.config.density for c in p.ready[:first_s] if c.stage == "F densities"} == {0.1, 0.05}
    assert {c.config.density for c in p.ready[last_s:] if c.stage == "F densities"} == {0.01, 0.3}


def test_the_probe_at_lower_densities_gets_its_own_lr_sweep(tmp_path, tiny_checkpoint):
    """Stage M: E runs the probe at 1 and 5% at its 10% lr; their own seed-0 sweep follows (the inherited lr's run
    is its seed 0), then seeds 1, 2 at a best lr that differs; both rows are kept."""
    from choosing.plan import SWEEPS

    runs, protocol = tmp_path / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    probe_lr = SWEEPS["sparse"][0]

    def pending(stage):
        return _unfinished(build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition",)), runs, stage,
                           "gradient")

    _, sweep = pending("M lr sweep")
    assert sweep == {(d, lr, 0) for d in (0.01, 0.05) for lr in SWEEPS["sparse"][1:]}
    # 1% peaks at 1e-4 (the widened 3e-4 is worse); 5% at the inherited lr: seeds 1, 2 only for 1% at 1e-4
    for lr, points in zip(SWEEPS["sparse"] + (3e-4,), (1, 2, 0, 0)):
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.01, learning_rate=lr),
                  [points] * 8)
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.05, learning_rate=lr),
                  [points] * 8)
    p, own = pending("M probe")
    assert p.best_lr[("addition", "sparse-gradient-0.01")] == 1e-4
    assert p.best_lr[("addition", "sparse-gradient-0.05")] == probe_lr
    assert own == {(0.01, 1e-4, seed) for seed in (1, 2)}
    _, inherited = pending("E densities")
    assert {(0.01, probe_lr, seed) for seed in (1, 2)} <= inherited  # E's row at the 10% lr stays


def test_the_second_task_at_1_percent_uses_the_main_tasks_own_1_percent_lrs(tmp_path, tiny_checkpoint):
    """Stage O: subtraction with the probe's and Fisher's 1% masks, 3 seeds, the probe at its own 1% lr (stage M's
    sweep) and Fisher at its own 10% lr (stage H's, which its 1% row uses on the main task too); each waits for its
    sweep."""
    from choosing.plan import SWEEPS

    runs, protocol = tmp_path / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)

    def second(stage="O"):
        p = build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition", "subtraction"))
        return p, {(c.config.mask, c.config.learning_rate, c.config.seed) for c in p.ready
                   if c.stage.startswith(stage) and c.config.task == "subtraction"}

    p, planned = second()
    assert not planned
    assert any("subtraction sparse-gradient-0.01 (O" in w and "sparse-gradient-0.01" in w for w in p.waiting)
    assert any("subtraction sparse-fisher-0.01 (O" in w and "sparse-fisher-0.1" in w for w in p.waiting)
    assert SWEEPS["sparse"][:2] == (3e-5, 1e-4)
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):  # the probe at 1%: best at 3e-5, inside its sweep
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.01, learning_rate=lr),
                  [points] * 8)
    for lr, points in zip(SWEEPS["sparse"] + (3e-4,), (1, 2, 1, 0)):  # Fisher at 10%: best at 1e-4 (widened)
        _fake_run(runs, protocol.replace(method="sparse", mask="fisher", density=0.1, learning_rate=lr), [points] * 8)
    _, planned = second()
    assert planned == {(mask, lr, seed) for mask, lr in (("gradient", 3e-5), ("fisher", 1e-4)) for seed in (0, 1, 2)}


def test_the_second_task_at_5_percent_uses_the_probes_own_5_percent_lr(tmp_path, tiny_checkpoint):
    """Stage P: subtraction with the probe's 5% mask, 3 seeds at its own 5% lr (stage M's sweep), which it waits
    for; not at the 10% lr that E ran 5% with."""
    from choosing.plan import SWEEPS

    runs, protocol = tmp_path / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)

    def second():
        p = build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition", "subtraction"))
        return p, {(c.config.mask, c.config.density, c.config.learning_rate, c.config.seed) for c in p.ready
                   if c.stage.startswith("P") and c.config.task == "subtraction"}

    p, planned = second()
    assert not planned
    assert any("subtraction sparse-gradient-0.05 (P" in w for w in p.waiting)
    assert SWEEPS["sparse"][0] == 3e-5 and sorted(SWEEPS["sparse"]) == [1e-5, 3e-5, 1e-4]  # 3e-5: the 10% probe's
    for lr, points in zip((1e-5, 3e-5, 1e-4, 3e-4), (1, 1, 2, 0)):  # the probe at 5%: best at 1e-4 (widened)
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.05, learning_rate=lr),
                  [points] * 8)
    p, planned = second()
    assert p.best_lr[("addition", "sparse-gradient-0.1")] == 3e-5
    assert p.best_lr[("addition", "sparse-gradient-0.05")] == 1e-4
    assert planned == {("gradient", 0.05, 1e-4, seed) for seed in (0, 1, 2)}


def test_random_at_1_and_30_percent_gets_its_own_lr_and_is_the_reference_there(tmp_path, tiny_checkpoint):
    """Stage N: E runs random at 1 and 30% at its 10% lr; their own seed-0 sweep follows, then seeds 1, 2 at a best
    lr that differs. The report's "vs random, same density" column then compares with random at that lr."""
    from choosing.plan import SWEEPS

    results = tmp_path / "choose_by"
    runs, protocol = results / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    inherited = SWEEPS["sparse"][0]  # random 10%'s best in _complete_sweeps

    def pending(stage):
        return _unfinished(build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition",)), runs, stage,
                           "random")

    _, sweep = pending("N lr sweep")
    assert sweep == {(d, lr, 0) for d in (0.01, 0.3) for lr in SWEEPS["sparse"][1:]}
    # 1% peaks at 1e-4 (the widened 3e-4 is worse); 30% at the inherited lr: seeds 1, 2 only for 1% at 1e-4
    random_1 = dict(method="sparse", mask="random", density=0.01)
    for lr, points in zip(SWEEPS["sparse"] + (3e-4,), (1, 2, 0, 0)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **random_1), [points] * 8)
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):
        _fake_run(runs, protocol.replace(method="sparse", mask="random", density=0.3, learning_rate=lr), [points] * 8)
    p, own = pending("N random")
    assert p.best_lr[("addition", "sparse-random-0.01")] == 1e-4
    assert p.best_lr[("addition", "sparse-random-0.3")] == inherited
    assert own == {(0.01, 1e-4, seed) for seed in (1, 2)}
    # random 1% scores 0.5 at the inherited lr and 1.0 at its own; the probe's 1% (E, inherited lr) scores 1.0
    _fake_run(runs, protocol.replace(**random_1, learning_rate=1e-4, seed=1), [2] * 8)
    _fake_run(runs, protocol.replace(**random_1, learning_rate=1e-4, seed=2), [2] * 8)
    for seed in (0, 1, 2):
        _fake_run(runs, protocol.replace(**random_1, learning_rate=inherited, seed=seed), [1] * 8)
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.01, learning_rate=inherited,
                                         seed=seed), [2] * 8)
    _fake_run(runs, protocol, [0] * 8)  # the base model
    assert choose_by.main(CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(results), "--work",
                                 str(tmp_path / "w"), "--report"]) == 0
    lines = results.with_suffix(".md").read_text().splitlines()
    probe_row = next(line for line in lines if line.startswith(f"| sparse-gradient-0.01 | {inherited:g} | 3 |"))
    assert "| 0.000 [0.000, 0.000] |" in probe_row  # against random at 1e-4 (1.0), not at its inherited lr (0.5)
    assert any(line.startswith("| sparse-random-0.01 | 0.0001 | 3 |") for line in lines)
    assert any(line.startswith(f"| sparse-random-0.01 | {inherited:g} | 3 |") for line in lines)  # E's row stays
    # whatever order the rows come in
    own_runs, inherited_runs = ["own"], ["inherited"]
    for rows in ({("addition", "sparse-random-0.01", inherited): inherited_runs,
                  ("addition", "sparse-random-0.01", 1e-4): own_runs},
                 {("addition", "sparse-random-0.01", 1e-4): own_runs,
                  ("addition", "sparse-random-0.01", inherited): inherited_runs}):
        assert random_reference(rows, p.best_lr, "addition", 0.01) is own_runs
        assert random_reference(rows, {}, "addition", 0.01) is next(iter(rows.values()))  # no sweep: inherited lr
    assert random_reference(rows, p.best_lr, "addition", 0.05) is None


def test_the_entropy_rows_get_their_own_lr_sweep(tmp_path, tiny_checkpoint):
    """Stage K: G runs the entropy rows at the lr of the row they restrict; their own seed-0 sweep follows, and seeds
    1, 2 at its best where that differs. The report's sweep table shows them."""
    from choosing.plan import SWEEPS

    results, protocol = tmp_path / "choose_by", _protocol()
    runs = results / "runs"
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    full_lr, probe_lr = SWEEPS["full"][0], SWEEPS["sparse"][0]
    full_entropy = dict(method="full", entropy_quantile=0.2)
    sparse_entropy = dict(method="sparse", mask="gradient", density=0.1, entropy_quantile=0.2)

    def plan():
        return build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, ("addition",))

    def pending(p, stage):
        return {(c.config.row, c.config.learning_rate, c.config.seed) for c in p.ready
                if c.stage.startswith(stage) and load_result(runs, c.config) is None}

    p = plan()
    assert pending(p, "G") >= {("full-entropy0.2", full_lr, s) for s in (0, 1, 2)}
    # the sweep's point at the inherited lr is G's seed 0: K plans only the other two of each family
    assert pending(p, "K lr sweep") == {("full-entropy0.2", lr, 0) for lr in SWEEPS["full"][1:]} | {
        ("sparse-gradient-0.1-entropy0.2", lr, 0) for lr in SWEEPS["sparse"][1:]}
    # full's entropy row peaks at the sweep's top edge (3e-5), the widened 1e-4 is worse: its own lr is 3e-5, and
    # seeds 1, 2 run there; the sparse entropy row peaks at the probe's own lr: nothing more
    for lr, points in zip(SWEEPS["full"], (1, 2, 0)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **full_entropy), [points] * 8)
    _fake_run(runs, protocol.replace(learning_rate=1e-4, **full_entropy), [0] * 8)
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):
        _fake_run(runs, protocol.replace(learning_rate=lr, **sparse_entropy), [points] * 8)
    p = plan()
    assert p.best_lr[("addition", "full-entropy0.2")] == 3e-5 != full_lr
    assert p.best_lr[("addition", "sparse-gradient-0.1-entropy0.2")] == probe_lr
    assert pending(p, "K entropy rows at their own lr") == {("full-entropy0.2", 3e-5, s) for s in (1, 2)}
    assert {("full-entropy0.2", full_lr, s) for s in (1, 2)} <= pending(p, "G")  # the inherited-lr row stays
    args = CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(results), "--work", str(tmp_path / "w"),
                  "--report"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert choose_by.main(args) == 0
    sweeps = results.with_suffix(".md").read_text().split("## Learning-rate sweeps")[1].split("\n## ")[0]
    full_entropy_line = next(line for line in sweeps.splitlines() if line.startswith("| full-entropy0.2 |"))
    assert "**3e-05: 1.000 [" in full_entropy_line and full_entropy_line.endswith("| 3e-05 |")
    assert any(line.startswith("| sparse-gradient-0.1-entropy0.2 |") for line in sweeps.splitlines())


def test_a_restarted_sweep_counts_runs_still_training_toward_parallel(tmp_path, tiny_checkpoint, monkeypatch):
    import subprocess
    import time

    results, work = tmp_path / "results", tmp_path / "work"
    base = _protocol()  # the first run the plan schedules
    staged = tmp_path / "staged"
    _fake_run(staged, base, [1] * 8)
    (work / "jobs").mkdir(parents=True)
    result_path(results / "runs", base).parent.mkdir(parents=True)
    # a worker of an earlier sweep (killed with -9), still training: its command line names the run, its pid file
    # points at it, and it writes the run's JSON when it ends (atomically, as run_one does)
    orphan = subprocess.Popen([sys.executable, "-c", "import os, shutil, sys, time; time.sleep(3); "
                               "shutil.copy(sys.argv[1], sys.argv[2] + '.tmp'); os.replace(sys.argv[2] + '.tmp', "
                               "sys.argv[2])", str(result_path(staged, base)),
                               str(result_path(results / "runs", base)), base.run_id()])
    (work / "jobs" / f"{base.run_id()}.pid").write_text(str(orphan.pid))
    deadline = time.time() + 30  # Popen can return before /proc shows the new command line: wait until it does
    while running_pid(work, base.run_id()) is None and time.time() < deadline:
        time.sleep(0.01)
    assert running_pid(work, base.run_id()) == orphan.pid
    monkeypatch.setattr(time, "sleep", lambda s, _sleep=time.sleep: _sleep(min(s, 0.2)))
    args = CLI + ["--model-dir", str(tiny_checkpoint), "--results", str(results), "--work", str(work),
                  "--parallel", "1", "--max-runs", "1"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert choose_by.main(args) == 0
    orphan.wait()
    started = [line.split("]")[0].strip("[") for line in buffer.getvalue().splitlines() if "started" in line]
    # the one slot was held until the orphan ended: one run started after its JSON appeared, never the orphan's own
    assert len(started) == 1 and started[0] != base.run_id()
    assert (work / "logs" / f"{started[0]}.log").stat().st_mtime >= result_path(results / "runs", base).stat().st_mtime


def test_paired_script_pairs_rows_by_seed_whatever_the_lr_spelling(tmp_path):
    import choose_by_paired
    from choosing.stats import difference_interval

    runs, protocol = tmp_path / "runs", _protocol()
    sparse = dict(method="sparse", mask="gradient", density=0.1)
    rows = {seed: ([2] * 6 + [seed, 0], [1] * 8) for seed in (2, 0, 1)}  # written out of seed order
    for seed, (correct, reference) in rows.items():
        _fake_run(runs, protocol.replace(learning_rate=1e-4, seed=seed, **sparse), correct)
        _fake_run(runs, protocol.replace(method="full", learning_rate=3e-6, seed=seed), reference)
    _fake_run(runs, protocol.replace(learning_rate=1e-4, seed=3, steps=9, **sparse), [0] * 8)  # another protocol
    _fake_run(runs, protocol.replace(learning_rate=3e-5, seed=0, **sparse), [0] * 8)  # another lr

    seeds_a, seeds_b, interval = choose_by_paired.paired_difference(runs, protocol, "addition",
                                                                    "sparse-gradient-0.1@0.0001", "full@3e-6")
    assert seeds_a == seeds_b == [0, 1, 2]
    sparse_matrix = np.array([[1, 1, 1, 1, 1, 1, s / 2, 0] for s in (0, 1, 2)])  # correct / eval_samples, by seed
    expected = difference_interval(sparse_matrix, np.full((3, 8), 0.5))
    assert interval == expected and interval.estimate > 0.3
    # "1e-4" names the same runs; the step-wise evaluation is reachable too (step steps-1: every prompt at 0)
    assert choose_by_paired.paired_difference(runs, protocol, "addition", "sparse-gradient-0.1@1e-4",
                                              "full@0.000003")[2] == interval
    at_first = choose_by_paired.paired_difference(runs, protocol, "addition", "sparse-gradient-0.1@1e-4",
                                                  "full@3e-6", step=protocol.steps - 1)[2]
    assert at_first.estimate == 0.0
    # a row with an extra seed is paired with the reference on the seeds both ran, unless every seed is asked for
    _fake_run(runs, protocol.replace(method="full", learning_rate=3e-6, seed=4), [0] * 8)
    assert choose_by_paired.paired_difference(runs, protocol, "addition", "sparse-gradient-0.1@1e-4",
                                              "full@3e-6") == ([0, 1, 2], [0, 1, 2], interval)
    seeds_a, seeds_b, every = choose_by_paired.paired_difference(runs, protocol, "addition",
                                                                 "sparse-gradient-0.1@1e-4", "full@3e-6",
                                                                 all_seeds=True)
    assert seeds_b == [0, 1, 2, 4]
    assert every == difference_interval(sparse_matrix, np.array([[0.5] * 8] * 3 + [[0.0] * 8]), same_seeds=False)
    # a reference with other seeds is resampled unpaired
    _fake_run(runs, protocol.replace(method="full", learning_rate=1e-6, seed=5), [1] * 8)
    seeds_a, seeds_b, unpaired = choose_by_paired.paired_difference(runs, protocol, "addition",
                                                                    "sparse-gradient-0.1@1e-4", "full@1e-6")
    assert seeds_b == [5] and unpaired == difference_interval(sparse_matrix, np.full((1, 8), 0.5), same_seeds=False)
    unknown = "no finished runs of addition lora-r16 at lr 3e-05; .* rows of addition:.*sparse-gradient-0.1@0.0001"
    with pytest.raises(ValueError, match=unknown):
        choose_by_paired.paired_difference(runs, protocol, "addition", "lora-r16@3e-5", "full@3e-6")
    with pytest.raises(ValueError, match="expected ROW@LR"):
        choose_by_paired.paired_difference(runs, protocol, "addition", "sparse-gradient-0.1", "full@3e-6")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        choose_by_paired.main(["addition", "full@abc", "full@3e-6", "--runs", str(runs)])
    assert "expected ROW@LR" in err.getvalue()


def test_paired_script_reads_runs_of_the_length_asked_for(tmp_path):
    """Stage Q's runs train twice the protocol's steps: ``--steps`` selects them, the default ignores them."""
    import choose_by_paired

    runs, default = tmp_path / "runs", choose_by.protocol_of(choose_by.parse_args([]))
    for steps, sparse_correct in ((default.steps, [4] * 8), (2 * default.steps, [0] * 8)):
        for seed in (0, 1):
            full = default.replace(method="full", learning_rate=3e-6, seed=seed, steps=steps)
            _fake_run(runs, full, [2] * 8)
            _fake_run(runs, full.replace(method="sparse", mask="gradient", density=0.05, learning_rate=3e-5),
                      sparse_correct)
    printed = {}
    for extra in ([], ["--steps", str(2 * default.steps)]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            choose_by_paired.main(["addition", "sparse-gradient-0.05@3e-5", "full@3e-6",
                                   "--runs", str(runs)] + extra)
        printed[bool(extra)] = out.getvalue()
    assert "seeds [0, 1] vs [0, 1]" in printed[False] and ": +0.500 [+0.500, +0.500]" in printed[False]
    assert ": -0.500 [-0.500, -0.500]" in printed[True]


def test_reproduced_script_compares_a_rerun_with_its_first_run_in_git_history(tmp_path):
    import choose_by_reproduced

    runs, config = tmp_path / "results" / "runs", _protocol().replace(method="full", learning_rate=3e-6)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    _fake_run(runs, config, [2, 1, 0, 2, 2, 1, 0, 1])
    first = json.loads(result_path(runs, config).read_text())
    for added_later in ("posthoc_fill", "mask_from_task"):  # a first run recorded before these fields existed
        del first["config"][added_later]
    result_path(runs, config).write_text(json.dumps(first))
    other = config.replace(seed=1)
    _fake_run(runs, other, [1] * 8)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "first runs"], check=True)
    assert choose_by_reproduced.check(runs) == []  # no reruns yet

    def rerun(cfg, correct, **changes):
        first = json.loads(result_path(runs, cfg).read_text())
        _fake_run(runs, cfg, correct)
        record = json.loads(result_path(runs, cfg).read_text())
        record.update(previous_run={"final_reward": first["final_reward"]}, seconds=999.0, **changes)
        result_path(runs, cfg).write_text(json.dumps(record))

    rerun(config, [2, 1, 0, 2, 2, 1, 0, 1], median_step_seconds=7.0)  # only times (and defaulted fields) differ
    rerun(other, [1] * 7 + [2])  # one prompt's count differs at the last evaluation
    subprocess.run(git + ["commit", "-qam", "reruns"], check=True)
    assert choose_by_reproduced.check(runs) == [(config.run_id(), []),
                                                (other.run_id(), ["evals.correct", "final_reward"])]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert choose_by_reproduced.main(["--runs", str(runs)]) == 1
    assert f"{config.run_id()}: reproduced" in buffer.getvalue()
    assert f"{other.run_id()}: DIFFERS in evals.correct, final_reward" in buffer.getvalue()
    # a rerun whose first run never reached git cannot be checked, and says so
    fresh = config.replace(seed=2)
    _fake_run(runs, fresh, [1] * 8)
    rerun(fresh, [1] * 8)
    assert (fresh.run_id(), None) in choose_by_reproduced.check(runs)


def test_posthoc_fill_names_its_row_and_cuts_the_mask_with_it(tmp_path, tiny_checkpoint):
    """Stage F's post-hoc rows fill what the bf16 diff leaves short of the density with the entries nearest to
    changing ("moved"): their rows and ids stand apart from the 10% rows cut with the lowest-index fill (which keep
    their ids and records), the run cuts its mask with its fill from fp32 final weights, and refuses bf16 ones."""
    from choosing.runs import _sparse_config
    from safetensors.torch import save_file

    from sparse_rl.discovery import diff_mask, half_ulp

    runs, protocol = tmp_path / "runs", _protocol()
    rounded = protocol.replace(method="sparse", mask="posthoc", density=0.3, learning_rate=3e-5)
    moved = rounded.replace(posthoc_fill="moved")
    assert (rounded.row, moved.row) == ("sparse-posthoc-0.3", "sparse-posthoc-0.3-fill-moved")
    assert "fill" not in rounded.run_id() and moved.run_id() != rounded.run_id()
    for bad in (dict(mask="random", posthoc_fill="moved"), dict(posthoc_fill="index")):
        with pytest.raises(ValueError, match="posthoc_fill is one of"):
            rounded.replace(**bad)
    _fake_run(runs, rounded, [1] * 8)  # a record written before the field existed: the lowest-index fill
    record = json.loads(result_path(runs, rounded).read_text())
    del record["config"]["posthoc_fill"]
    result_path(runs, rounded).write_text(json.dumps(record))
    assert load_result(runs, rounded) is not None and load_result(runs, moved) is None

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    final = {n: w + 3 * torch.rand(w.shape, generator=generator) ** 4 * half_ulp(w) for n, w in weights.items()}
    save_file(final, str(tmp_path / "fp32.safetensors"))
    cut = {fill: diff_mask(tiny_checkpoint, tmp_path / "fp32.safetensors", density=0.3, fill=fill,
                           rank_changed="rounded", compare_dtype=torch.bfloat16) for fill in ("moved", "rounded")}
    assert cut["moved"] != cut["rounded"]
    for config, fill in ((moved, "moved"), (rounded, "rounded")):
        assert _sparse_config(config, None, tiny_checkpoint, tmp_path / "fp32.safetensors").mask == cut[fill]
    save_file({n: w.to(torch.bfloat16) for n, w in final.items()}, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(ValueError, match="stores bf16 .* delete it to rerun"):
        _sparse_config(moved, None, tiny_checkpoint, tmp_path / "bf16.safetensors")
    _sparse_config(rounded, None, tiny_checkpoint, tmp_path / "bf16.safetensors")  # the rounded fill needs no more


def test_posthoc_rank_names_its_row_and_orders_the_changed_entries_with_it(tmp_path, tiny_checkpoint):
    """Stage S's post-hoc rows rank the changed entries a density keeps only some of by their move before rounding:
    their rows and ids stand apart from F's (ranked by the rounded |Δ|, whose records lack the field), the run cuts
    its mask with that rank from fp32 final weights, and refuses bf16 ones."""
    from choosing.runs import _sparse_config
    from safetensors.torch import save_file

    from sparse_rl.discovery import diff_mask, half_ulp

    runs, protocol = tmp_path / "runs", _protocol()
    filled = protocol.replace(method="sparse", mask="posthoc", density=0.05, learning_rate=3e-5, posthoc_fill="moved")
    ranked = filled.replace(posthoc_rank="moved")
    assert ranked.row == "sparse-posthoc-0.05-fill-moved-rank-moved" and ranked.run_id() != filled.run_id()
    for bad in (dict(mask="random", posthoc_fill="rounded", posthoc_rank="moved"), dict(posthoc_rank="index")):
        with pytest.raises(ValueError, match="posthoc_rank is one of"):
            filled.replace(**bad)
    _fake_run(runs, filled, [1] * 8)  # a record written before the field existed: ranked by the rounded |Δ|
    record = json.loads(result_path(runs, filled).read_text())
    del record["config"]["posthoc_rank"]
    result_path(runs, filled).write_text(json.dumps(record))
    assert load_result(runs, filled) is not None and load_result(runs, ranked) is None

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)  # ~24% of entries move more than half a bf16 spacing: above 5%
    final = {n: w + 3 * torch.rand(w.shape, generator=generator) ** 4 * half_ulp(w) for n, w in weights.items()}
    save_file(final, str(tmp_path / "fp32.safetensors"))
    cut = {rank: diff_mask(tiny_checkpoint, tmp_path / "fp32.safetensors", density=0.05, rank_changed=rank,
                           compare_dtype=torch.bfloat16) for rank in ("moved", "rounded")}
    assert cut["moved"] != cut["rounded"]
    for config, rank in ((ranked, "moved"), (filled, "rounded")):
        assert _sparse_config(config, None, tiny_checkpoint, tmp_path / "fp32.safetensors").mask == cut[rank]
    save_file({n: w.to(torch.bfloat16) for n, w in final.items()}, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(ValueError, match="stores bf16 .* delete it to rerun"):
        _sparse_config(ranked.replace(posthoc_fill="rounded"), None, tiny_checkpoint, tmp_path / "bf16.safetensors")


def test_plot_styles_keep_a_masks_colour_and_mark_entropy_and_other_task_rows():
    from choosing.report import _style

    assert _style("sparse-posthoc-0.1") == ("sparse, posthoc", "C3", "o")
    assert _style("sparse-posthoc-0.1-from-addition") == ("sparse, posthoc from addition", "C3", "X")
    assert _style("sparse-gradient-0.1-entropy0.2") == ("sparse, gradient, top-20% entropy tokens", "C2", "o")
    assert _style("lora-r44")[1:] == ("C1", "D") and _style("full")[1:] == ("C0", "s")
    assert _style("sparse-posthoc-0.3-fill-moved") == ("sparse, posthoc, moved fill", "C3", "P")
    assert _style("sparse-posthoc-0.01-fill-moved-rank-moved") == ("sparse, posthoc, moved fill, ranked by move", "C3",
                                                                    "*")


def test_the_second_task_trains_twice_as_long_in_a_section_of_its_own(tmp_path, tiny_checkpoint):
    """Stage Q: full finetuning, the matched LoRA and the probe's 5% mask on the second task at twice the steps, each
    at its protocol-length row's lr (the 5% mask waits for its own sweep). The report gives them their own section,
    apart from the protocol-length rows, with how much full finetuning gained after the protocol's last step."""
    from choosing.plan import LONGER, SWEEPS

    results = tmp_path / "choose_by"
    runs, protocol = results / "runs", _protocol()
    rank = matched_lora_rank(tiny_checkpoint)
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    tasks = ("addition", "subtraction")

    def longer_runs():
        p = build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, tasks)
        return p, {(c.config.row, c.config.learning_rate, c.config.seed, c.config.steps) for c in p.ready
                   if c.stage.startswith("Q")}

    p, planned = longer_runs()
    steps = LONGER * protocol.steps
    assert planned == {(row, SWEEPS[family][0], seed, steps) for row, family in (("full", "full"),
                                                                                    (f"lora-r{rank}", "lora"))
                       for seed in (0, 1, 2)}
    assert any("subtraction sparse-gradient-0.05 (Q" in w for w in p.waiting)
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):  # the probe's 5% sweep: best at its middle lr
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.05, learning_rate=lr),
                  [points] * 8)
    p, planned = longer_runs()
    assert {("sparse-gradient-0.05", SWEEPS["sparse"][0], seed, steps) for seed in (0, 1, 2)} <= planned
    # seed by seed, the default before LoRA: two runs at a time pair the default with full finetuning first
    order = [(c.config.seed, c.config.row) for c in p.ready if c.stage.startswith("Q")]
    assert order == [(seed, row) for seed in (0, 1, 2) for row in ("full", "sparse-gradient-0.05", f"lora-r{rank}")]
    # full finetuning at both lengths: the longer runs reach 0.5 at the protocol's last step, then 1.0
    _fake_run(runs, protocol.replace(task="subtraction"), [0] * 8)  # the base model
    for seed in (0, 1, 2):
        shorter = protocol.replace(task="subtraction", method="full", learning_rate=SWEEPS["full"][0], seed=seed)
        _fake_run(runs, shorter, [1] * 8)
        longer = shorter.replace(steps=steps)
        _fake_run(runs, longer, [2] * 8)
        record = json.loads(result_path(runs, longer).read_text())
        record["evals"] = [{"step": protocol.steps, "reward": 0.5, "correct": [1] * 8}] + record["evals"]
        result_path(runs, longer).write_text(json.dumps(record))
    assert CLI[-2:] == ["--tasks", "addition"]
    assert choose_by.main(CLI[:-1] + ["addition,subtraction", "--model-dir", str(tiny_checkpoint), "--results",
                                      str(results), "--work", str(tmp_path / "w"), "--report"]) == 0
    text = results.with_suffix(".md").read_text()
    assert f"## subtraction at {steps} steps (stage Q)" in text
    section = text.split(f"## subtraction at {steps} steps")[1].split("## Every finished run")[0]
    assert next(line for line in section.splitlines() if line.startswith("| full |")).split(" | ")[2] == "3"
    assert f"Full finetuning's held-out reward from step {protocol.steps} to {steps}: 0.500 [0.500, 0.500]" in section
    assert f"subtraction__full__lr{SWEEPS['full'][0]:g}__s0__" in text.split("## Every finished run")[1]
    # the protocol-length subtraction table keeps its own runs only
    shorter_table = text.split("## subtraction: rows at their chosen lr")[1].split("## subtraction at")[0]
    assert "| full | " in shorter_table and "| 0.500 [" in shorter_table


def test_the_default_gets_an_lr_sweep_at_the_longer_length(tmp_path, tiny_checkpoint):
    """Stage R: the default (the probe's 5% mask) on the second task at stage Q's length, seed 0 at the two
    neighbours of its own lr, then seeds 1, 2 at a neighbour that beats it; it comes after stage F's 10% and 5% rows
    and before F's 1% and 30%."""
    from choosing.plan import LONGER, SWEEPS

    runs, protocol = tmp_path / "runs", _protocol()
    _complete_sweeps(runs, protocol, tiny_checkpoint, best=[2] * 8, other=[1] * 8)
    steps, tasks = LONGER * protocol.steps, ("addition", "subtraction")

    def stage_r():
        p = build_plan(protocol, runs, tmp_path / "w", tiny_checkpoint, tasks)
        return p, [(c.config.task, c.config.density, c.config.learning_rate, c.config.seed, c.config.steps)
                   for c in p.ready if c.stage.startswith("R")]

    p, planned = stage_r()
    assert not planned  # the default's own protocol-length lr is not known yet
    for lr, points in zip(SWEEPS["sparse"], (2, 1, 1)):  # the probe's 5% sweep: best at 3e-5
        _fake_run(runs, protocol.replace(method="sparse", mask="gradient", density=0.05, learning_rate=lr),
                  [points] * 8)
        for mask in ("fisher", "magnitude"):  # stage H: their own 10% lr, so stage F plans them
            _fake_run(runs, protocol.replace(method="sparse", mask=mask, density=0.1, learning_rate=lr), [points] * 8)
    p, planned = stage_r()
    assert planned == [("subtraction", 0.05, lr, 0, steps) for lr in (1e-5, 1e-4)]
    assert f"subtraction sparse-gradient-0.05 at {steps} steps, seeds 1, 2 at its own lr (R): waits for its seed-0 " \
           "lr sweep (0/3 done)" in p.waiting
    stages = [c.stage for c in p.ready]
    first_r, last_r = stages.index("R lr sweep of the default, longer"), len(stages) - 1 - stages[::-1].index(
        "R lr sweep of the default, longer")
    f_before = [c.config.density for c in p.ready[:first_r] if c.stage == "F densities"]
    f_after = [c.config.density for c in p.ready[last_r:] if c.stage == "F densities"]
    assert (f_before, f_after) == ([0.05] * 6, [0.01] * 6 + [0.3] * 6)  # Fisher, smallest |w| x 3 seeds
    # seed 0 at the three lrs: 1e-5 beats the default's 3e-5 at the longer length, so seeds 1, 2 train there
    longer = protocol.replace(task="subtraction", method="sparse", mask="gradient", density=0.05, steps=steps,
                              learning_rate=3e-5)
    for lr, points in ((3e-5, 1), (1e-5, 2), (1e-4, 0)):
        _fake_run(runs, longer.replace(learning_rate=lr), [points] * 8)
    p, planned = stage_r()
    assert [x for x in planned if x[3] > 0] == [("subtraction", 0.05, 1e-5, seed, steps) for seed in (1, 2)]
    # the neighbour loses: nothing more
    _fake_run(runs, longer.replace(learning_rate=1e-5), [0] * 8)
    assert [x for x in stage_r()[1] if x[3] > 0] == []


def test_the_sweep_imports_the_sparse_rl_of_its_own_checkout(tmp_path):
    """A sweep run from a separate worktree must train with that worktree's sparse_rl, not with the checkout an
    editable install points at (edits there would otherwise reach runs started after them)."""
    import shutil

    repo = Path(__file__).resolve().parent.parent
    checkout = tmp_path / "worktree"
    shutil.copytree(repo / "benchmarks" / "choosing", checkout / "benchmarks" / "choosing")
    shutil.copy(repo / "benchmarks" / "choose_by.py", checkout / "benchmarks" / "choose_by.py")
    shutil.copytree(repo / "sparse_rl", checkout / "sparse_rl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # the script's top level, as `python benchmarks/choose_by.py` runs it (without main()), then the package it sees
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); import sparse_rl; "
            "print(sparse_rl.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(checkout / "benchmarks" / "choose_by.py")], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert Path(out).resolve() == (checkout / "sparse_rl" / "__init__.py").resolve()
