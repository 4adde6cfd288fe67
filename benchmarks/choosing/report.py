"""``choose_by.py --report``: the markdown report and plot from whatever runs have finished.

Rows are aggregated at the learning rate the plan chose for them (the best of their family's sweep); until a sweep is
complete its runs appear only in the sweep table and the per-run table. Intervals come from ``stats.py``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from choosing.plan import DENSITIES, LONGER, MAIN_DENSITY, MAX_WIDENING, SWEEPS, build_plan, own_row
from choosing.runs import RunConfig, running_pid
from choosing.stats import (
    difference_interval,
    gain_share_interval,
    mean_interval,
    same_seeds,
    sampling_sd,
    seed_sd,
    success_matrix,
)


def _protocol_matches(record: dict, protocol: RunConfig) -> bool:
    """The run used the sizes of ``protocol`` (a base evaluation: its evaluation settings)."""
    sizes = protocol.replace(method="full", learning_rate=1.0).protocol()  # every size, whatever protocol's method
    config = RunConfig(**record["config"])
    return config.protocol() == config.replace(**sizes).protocol()


def load_runs(runs_dir: Path, protocol: RunConfig) -> list[dict]:
    records = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if _protocol_matches(record, protocol):
            records.append(record)
    return records


def _ci(interval, digits: int = 3) -> str:
    if interval is None:
        return "-"
    return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _family(row: str) -> str:
    return row.split("-")[0]


def random_reference(rows: dict, best_lr: dict, task: str, density: float) -> list[dict] | None:
    """The runs a mask's row at ``density`` is compared with: random at the same density, at random's own lr where
    its sweep chose one (stage N), else at the lr it inherited (``rows``: (task, row, lr) -> runs)."""
    row = f"sparse-random-{density:g}"
    refs = {lr: runs for (t, r, lr), runs in rows.items() if t == task and r == row}
    return refs.get(best_lr.get((task, row))) or next(iter(refs.values()), None)


def _by_row(records: list[dict]) -> dict[tuple, list[dict]]:
    """(task, row, lr) -> the runs of that row at that lr, by seed (so paired rows line up)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["config"]["seed"]):
        groups[(r["config"]["task"], r["row"], r["config"]["learning_rate"])].append(r)
    return groups


def write_report(results: Path, protocol: RunConfig, model_dir, tasks, extra_seeds: int, work: Path) -> Path:
    runs_dir = Path(results) / "runs"
    records = load_runs(runs_dir, protocol)
    plan = build_plan(protocol, runs_dir, Path(work) / "weights", model_dir, tasks, extra_seeds)
    base = {r["config"]["task"]: r for r in records if r["config"]["method"] == "base"}
    trained = [r for r in records if r["config"]["method"] != "base"]
    # stage Q's runs, twice the protocol's steps: their own section, not mixed into the rows of the protocol's length
    longer_protocol = protocol.replace(steps=LONGER * protocol.steps)
    longer = [r for r in load_runs(runs_dir, longer_protocol) if r["config"]["method"] != "base"]
    groups = _by_row(trained)
    chosen = {(p.config.task, p.config.row, p.config.learning_rate) for p in plan.ready
              if not p.stage.startswith("0 base") and "lr sweep" not in p.stage}  # widened points are sweep runs too
    command = (Path(results) / "command.txt").read_text().strip() if (Path(results) / "command.txt").exists() else \
        "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py --parallel 1"
    seconds = [r["seconds"] for r in trained + longer]
    done_ids = {r["id"] for r in records + longer}
    # a regenerating full run has a record already but still has to train again (its final weights were lost)
    pending = [p for p in plan.ready if p.regenerate or p.config.run_id() not in done_ids]
    per_run = statistics.mean(seconds) if seconds else None

    lines = [
        "# The table a user chooses by: full finetuning vs LoRA vs sparse_rl (issue 18)", "",
        f"GRPO on SmolLM2-135M-Instruct (fp32, CPU, one torch thread per run), {protocol.steps} steps of "
        f"{protocol.prompts_per_step} prompts x {protocol.num_generations} completions of "
        f"{protocol.max_completion_length} tokens, constant lr, no weight decay. Held-out reward: "
        f"{protocol.eval_pairs} prompts never trained on x {protocol.eval_samples} samples at temperature 1 "
        f"(the same sampling seed for every model), every {protocol.eval_every} steps. Intervals: 95% bootstrap over "
        "seeds and prompts (prompts shared by all rows, so comparisons are paired; `benchmarks/choosing/stats.py`). "
        "Costs come from the same runs: peak resident memory while training, median time per step (the machine is "
        "shared, so times vary with its load), optimizer-state bytes, trained entries. With 3 seeds a bootstrap "
        "over seeds has only 10 distinct draws and its intervals are somewhat too narrow; the seed SD column shows "
        "the raw spread. The sampling SD column is the part of one run's score that comes from sampling "
        f"{protocol.eval_samples} completions per prompt (the evaluation noise; the seed SD contains it). A reward's "
        "interval is mostly which prompts were drawn (prompt resampling), which cancels in paired comparisons: a "
        "difference is resolved when its paired interval excludes 0.", "",
        f"Sweep command (resumable: finished runs are skipped): `{command}`; report: "
        "`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/choose_by.py --report`.", "",
        f"CPU: {trained[0]['cpu'] if trained else (records[0]['cpu'] if records else '-')}.", "",
        "## Status", "",
        f"{len(records) + len(longer)} runs finished ({len(trained) + len(longer)} trained, {len(base)} base "
        f"evaluations); {len(pending)} "
        f"schedulable now, more once the {len(plan.waiting)} items below that wait for earlier runs can start."
        + (f" Mean wall time per finished training run {per_run / 60:.0f} min: the schedulable runs need about "
           f"{len(pending) * per_run / 3600:.0f} h of one process." if per_run else ""), "",
    ]
    if pending:
        def state(p) -> str:
            pid = running_pid(work, p.config.run_id())
            return f"`{p.config.run_id()}`" + (f" (running, pid {pid})" if pid else "") \
                + (" (again, for its final weights)" if p.regenerate else "")

        lines.append(f"Next runs, in order ({len(pending)} schedulable now): "
                     + ", ".join(state(p) for p in pending[:6]) + (" ..." if len(pending) > 6 else ""))
        lines.append("")
    if plan.waiting:
        lines += ["Waiting for earlier runs:", ""] + [f"- {w}" for w in plan.waiting] + [""]

    # base rewards
    lines += ["## Base model", "",
              "| task | held-out reward of the untrained model [95% CI over prompts] | in 0.1-0.8 |", "|---|---|---|"]
    for task in tasks:
        if task in base:
            interval = mean_interval(success_matrix([base[task]]))
            lines.append(f"| {task} | {_ci(interval)} | {'yes' if 0.1 <= interval.estimate <= 0.8 else 'NO'} |")
        else:
            lines.append(f"| {task} | pending | - |")
    lines.append("")

    # learning-rate sweeps
    lines += ["## Learning-rate sweeps (seed 0)", "",
              "Final held-out reward [95% CI over prompts]; the best lr of each row (bold: highest final held-out "
              "reward of seed 0) is used for its other seeds and for the rows of its family (random masks at every "
              "density: the 10% random row's first, then at 1 and 30% their own sweep's where its best differs; the "
              "'vs random' column compares with random at its own lr where it has one; LoRA rank 16: the matched-"
              "count LoRA's; entropy rows: first the row they restrict's, then their own sweep's where its best "
              "differs). The Fisher, smallest-|w| and post-hoc masks first ran at the 10% gradient probe's lr (their "
              "rows at that lr, and the second task's first choice of masks, keep it); their own sweeps came later, "
              "and their other densities, 3 seeds at 10% where their best differs, the second task's two best masks "
              "by that measure and the post-hoc masks cut from the other task's full run use their own. The second "
              "task has no sweep of its own: its rows use the main task's lr. One seed per lr, so a sweep only "
              "separates learning rates whose difference exceeds the seed spread (see the seed SD column below).", "",
              "A row whose best lr sits at the edge of its sweep gets the next lr of the 1-3-10 grid beyond it (up to "
              f"{MAX_WIDENING} more) before its lr is chosen.", ""]
    main_task = tasks[0]
    swept_rows = sorted({row for (task, row, lr) in groups if (task, row) in plan.sweep_lrs})
    columns = max([len(plan.sweep_lrs.get((main_task, row), ())) for row in swept_rows] + [3])
    lines += ["| row | " + " | ".join(f"lr {i + 1}" for i in range(columns)) + " | best |",
              "|---|" + "---|" * (columns + 1)]
    for row in swept_rows:
        family = _family(row)
        cells = []
        best = plan.best_lr.get((main_task, row))
        lrs = plan.sweep_lrs.get((main_task, row), sorted(SWEEPS[family]))
        for lr in lrs:
            runs = [r for r in groups.get((main_task, row, lr), []) if r["config"]["seed"] == 0]
            if runs:
                text = f"{lr:g}: {_ci(mean_interval(success_matrix(runs)))}"
                cells.append(f"**{text}**" if lr == best else text)
            else:
                cells.append(f"{lr:g}: pending")
        cells += [""] * (columns - len(cells))
        note = "-" if best is None else f"{best:g}" + (" (still at the edge after widening)"
                                                     if best in (min(lrs), max(lrs)) else "")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {note} |")
    lines.append("")

    # main table per task
    figure_rows = []
    for task in tasks:
        # seed 0 of a swept row ran in the sweep, at the lr now chosen: it is part of the row's group
        rows = {key: g for key, g in groups.items() if key[0] == task and key in chosen}
        if not rows:
            lines += [f"## {task}: rows at their chosen lr", "", "No row has its learning rate chosen yet "
                      "(the sweeps are not complete).", ""]
            continue
        table, figure = _rows_table(rows, base.get(task), plan.best_lr, task)
        lines += [f"## {task}: rows at their chosen lr", ""] + table
        lines += _density_axis(rows, base.get(task), plan.best_lr, task)
        figure_rows += figure

    longer_groups = _by_row(longer)
    for task in tasks[1:]:
        rows = {key: g for key, g in longer_groups.items() if key[0] == task}
        if not rows:
            continue
        table, _ = _rows_table(rows, base.get(task), plan.best_lr, task)
        lines += [f"## {task} at {longer_protocol.steps} steps (stage Q)", "",
                  f"Issue 18 asks for longer runs where full finetuning's reward still rises at the last step "
                  f"(the line under the {task} table says whether it did at step {protocol.steps}): these rows train "
                  f"{LONGER}x as long, each at the lr of its {protocol.steps}-step row. A task's training set is "
                  "sized to the run's steps and the trainer shuffles it, so these runs see other batches from their "
                  f"first step on: new runs, not the {protocol.steps}-step runs continued. Stage R adds the "
                  "default at the two neighbours of its lr on the 1-3-10 grid (seed 0; seeds 1, 2 at one that beats "
                  "its lr there).", ""] + table
        full_key = next((k for k in rows if k[1] == "full"), None)
        if full_key:
            lines += [_reward_change(rows[full_key], protocol.steps), ""]

    # every finished run
    lines += ["## Every finished run", "", "| run | final held-out reward [95% CI over prompts] | curve (step: reward) "
              "| trained entries | optimizer state (MiB) | peak RSS (MiB) | median step (s) | load avg |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(trained + longer, key=lambda r: r["id"]):
        curve = ", ".join(f"{e['step']}: {e['reward']:.3f}" for e in r["evals"])
        lines.append(f"| `{r['id']}` | {_ci(mean_interval(success_matrix([r])))} | {curve} | "
                     f"{r['trained_entries']:,} | {_mib(r['optimizer_state_bytes'])} | "
                     f"{r.get('peak_rss_train_mib', 0):.0f} | {r.get('median_step_seconds', 0):.1f} | "
                     f"{r['load_average_start']:.1f} |")
    lines.append("")
    figure = Path(results).with_suffix(".png")
    if _plot(figure_rows, base, figure):
        lines += [f"![held-out reward against trained entries]({figure.name})", ""]
    out = Path(results).with_suffix(".md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return out


def _rows_table(rows: dict, base_record: dict | None, best_lr: dict, task: str) -> tuple[list[str], list[tuple]]:
    """The markdown table of one task's rows (``rows``: (task, row, lr) -> runs sorted by seed) with the verdict and
    whether full finetuning still rose, and the rows' entries for the plot."""
    lines = ["| row | lr | seeds | held-out reward [95% CI] | CI width | seed SD | sampling SD "
             "| share of full FT's gain [95% CI] | vs random, same density [95% CI] | trained entries "
             "| optimizer state (MiB) | peak RSS in train(), max over seeds (MiB) | median step (s) |",
             "|---" * 13 + "|"]
    figure_rows = []
    full_key = next((k for k in rows if k[1] == "full"), None)
    base_matrix = success_matrix([base_record]) if base_record else None
    for key in sorted(rows, key=lambda k: (_family(k[1]) != "full", _family(k[1]) != "lora", k[1])):
        runs = rows[key]
        matrix = success_matrix(runs)
        reward = mean_interval(matrix)
        share = None
        if full_key and base_matrix is not None and key != full_key:
            share = gain_share_interval(matrix, success_matrix(rows[full_key]), base_matrix,
                                        same_seeds=same_seeds(runs, rows[full_key]))
        versus, few = None, len(runs)
        config = runs[0]["config"]
        if config["method"] == "sparse" and config["mask"] != "random":
            ref = random_reference(rows, best_lr, task, config["density"])
            if ref:
                versus = difference_interval(matrix, success_matrix(ref), same_seeds=same_seeds(runs, ref))
                few = min(few, len(ref))
        cost = runs[-1]
        lines.append(
            f"| {key[1]} | {key[2]:g} | {len(runs)} | {_ci(reward)} | {reward.width:.3f} | {seed_sd(matrix):.3f} "
            f"| {sampling_sd(matrix, runs[0]['config']['eval_samples']):.3f} "
            f"| {_ci(share, 2)}{'†' * (share is not None and len(runs) < 3)} "
            f"| {_ci(versus)}{'†' * (versus is not None and few < 3)} | {cost['trained_entries']:,} | "
            f"{_mib(cost['optimizer_state_bytes'])} | {max(r.get('peak_rss_train_mib', 0) for r in runs):.0f} | "
            f"{statistics.median(r['median_step_seconds'] for r in runs):.1f} |")
        figure_rows.append((task, key[1], key[2], cost["trained_entries"], reward, runs))
    lines += ["", "† a row (or its random reference) with fewer than 3 seeds: the interval misses most of "
              "the seed spread.", "", _verdict(rows, base_matrix, full_key), ""]
    if full_key:
        lines += [_still_rising(rows[full_key]), ""]
    return lines, figure_rows


def _density_axis(rows: dict, base_record: dict | None, best_lr: dict, task: str) -> list[str]:
    """Each way of choosing a mask across densities in one view: its share of full finetuning's gain at its own lr
    (its row's sweep where it has one, else its 10% row's), the table above's figures without the rows at
    inherited lrs. Empty where the task has no full finetuning or no mask at more than one density."""
    full_key = next((k for k in rows if k[1] == "full"), None)
    if full_key is None or base_record is None:
        return []
    cells: dict[str, dict[float, tuple]] = defaultdict(dict)  # mask variant (row without density) -> density -> key
    for key, runs in rows.items():
        config = runs[0]["config"]
        if config["method"] != "sparse" or config["entropy_quantile"] != 1.0:
            continue
        own = best_lr.get((task, key[1])) or best_lr.get((task, own_row(config["mask"])))
        if key[2] == own:
            cells[key[1].replace(f"-{config['density']:g}", "", 1)][config["density"]] = key
    if not any(len(by_density) > 1 for by_density in cells.values()):
        return []
    base_matrix, full_matrix = success_matrix([base_record]), success_matrix(rows[full_key])

    def cell(key) -> str:
        if key is None:
            return "-"
        runs = rows[key]
        share = gain_share_interval(success_matrix(runs), full_matrix, base_matrix,
                                    same_seeds=same_seeds(runs, rows[full_key]))
        return f"{_ci(share, 2)}{'†' * (len(runs) < 3)} at {key[2]:g}"

    lines = [f"### {task}: the density axis (share of full finetuning's gain [95% CI] at each mask's own lr)", "",
             "| mask | " + " | ".join(f"{d:.0%}" for d in DENSITIES) + " |", "|---" * (len(DENSITIES) + 1) + "|"]
    for variant in sorted(cells):
        lines.append(f"| {variant} | " + " | ".join(cell(cells[variant].get(d)) for d in DENSITIES) + " |")
    return lines + ["", "A cell `-`: not run (or not at that mask's own lr yet); † fewer than 3 seeds.", ""]


def _reward_change(runs: list[dict], since: int, judge: bool = False) -> str:
    """Full finetuning's held-out reward gained from step ``since`` to its last evaluation, paired over seeds and
    prompts; with ``judge``, whether that is still a rise (issue 18: train longer if it is)."""
    change = difference_interval(success_matrix(runs), success_matrix(runs, since))
    text = f"Full finetuning's held-out reward from step {since} to {runs[0]['evals'][-1]['step']}: {_ci(change)}"
    if judge:
        text += (" (still rising: a longer run (`--steps`) would change the comparison)" if change.low > 0 else
                 " (not resolvably rising any more)")
    return text + "."


def _verdict(rows: dict, base_matrix, full_key) -> str:
    """Which mask at <= 10% density recovers at least 95% of full finetuning's gain (issue 18's target)."""
    if full_key is None or base_matrix is None:
        return "Share of full finetuning's gain: pending (full finetuning or the base evaluation is missing)."
    full = success_matrix(rows[full_key])
    clear, unresolved = [], []
    for (_, row, lr), runs in rows.items():
        config = runs[0]["config"]
        if config["method"] != "sparse" or config["density"] > MAIN_DENSITY or len(runs) < 3:
            continue
        share = gain_share_interval(success_matrix(runs), full, base_matrix,
                                    same_seeds=same_seeds(runs, rows[full_key]))
        named = f"{row} at lr {lr:g} ({_ci(share, 2)})"  # a row can be reported at two lrs (stage H)
        if share.low >= 0.95:
            clear.append(named)
        elif share.high >= 0.95:
            unresolved.append(named)
    if not clear and not unresolved:
        return ("No sparse row at <= 10% density with 3 seeds has an interval reaching 95% of full finetuning's "
                "gain yet.")
    return (f"Recovering >= 95% of full finetuning's gain with the whole interval: {', '.join(clear) or 'none'}; "
            f"interval includes 95% but cannot resolve it: {', '.join(unresolved) or 'none'}.")


def _still_rising(runs: list[dict]) -> str:
    """Whether full finetuning's held-out reward still rose over its last evaluation interval (issue 18: train
    longer if it does), as a paired difference over the same seeds and prompts."""
    steps = [e["step"] for e in runs[0]["evals"]]
    return _reward_change(runs, steps[-2], judge=True) if len(steps) >= 2 else ""


def _style(row: str) -> tuple[str, str, str]:
    """(legend name, colour, marker) of a row: one colour per way of choosing the trained entries, so the same mask
    reads the same at every density and on both tasks; filled markers for every token, open ones for q=0.2."""
    parts = row.split("-")
    name = "LoRA" if parts[0] == "lora" else ("full finetuning" if parts[0] == "full" else f"sparse, {parts[1]}")
    colors = {"full finetuning": "C0", "LoRA": "C1", "sparse, gradient": "C2", "sparse, fisher": "C4",
              "sparse, random": "C7", "sparse, magnitude": "C5", "sparse, posthoc": "C3"}
    color = colors.get(name, "C8")
    marker = {"full": "s", "lora": "D"}.get(parts[0], "o")
    if "-from-" in row:  # a post-hoc mask cut from another task's full run (stage L): its colour, its own marker
        name += f" from {row.split('-from-')[1].split('-')[0]}"
        marker = "X"
    if row.endswith("entropy0.2"):
        name += ", top-20% entropy tokens"
    if "-fill-moved" in row:  # a post-hoc mask filled by the entries nearest to changing (stage F): its own marker
        name += ", moved fill"
        marker = "P"
    if "-rank-moved" in row:  # its changed entries ranked by the move before rounding (stage S): its own marker
        name += ", ranked by move"
        marker = "*"
    return name, color, marker


def _plot(figure_rows: list, base: dict, path: Path) -> bool:
    """Per task: held-out reward against trained entries (rows at their chosen lr, 95% CI; faint dots: each seed), and
    each row's mean curve over steps. Rows at the same count (every 10% mask, LoRA at the matched rank) are spread a
    little sideways so their bars do not cover each other."""
    if not figure_rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for t, *_ in figure_rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9), squeeze=False)
    counts = [entries for _, _, _, entries, *_ in figure_rows]
    for column, task in enumerate(tasks):
        rows = [r for r in figure_rows if r[0] == task]
        ax, curves = axes[0][column], axes[1][column]
        # a row at two lrs (stage H: the probe's, then its own) gets two places and a triangle at the larger lr
        order = sorted({(_style(row)[0], lr) for _, row, lr, *_ in rows})
        lrs_of = {row: [lr for _, r, lr, *_ in rows if r == row] for _, row, *_ in rows}
        seen = set()
        for _, row, lr, entries, reward, runs in rows:
            name, color, marker = _style(row)
            marker = "^" if lr > min(lrs_of[row]) else marker
            x = entries * 1.07 ** (order.index((name, lr)) - (len(order) - 1) / 2)
            fill = "none" if row.endswith("entropy0.2") else color
            label = None if name in seen else name
            seen.add(name)
            ax.errorbar(x, reward.estimate, yerr=[[reward.estimate - reward.low], [reward.high - reward.estimate]],
                        fmt=marker, color=color, mfc=fill, capsize=3, label=label)
            ax.scatter([x] * len(runs), [r["final_reward"] for r in runs], color=color, alpha=0.3, s=10)
            steps = [0] + [e["step"] for e in runs[0]["evals"]]
            start = base[task]["final_reward"] if task in base else np.nan
            mean = [start] + [float(np.mean([r["evals"][i]["reward"] for r in runs])) for i in range(len(steps) - 1)]
            density = row.split("-")[2] if row.startswith("sparse") else ""
            curves.plot(steps, mean, marker=marker, color=color, mfc=fill, markersize=4,
                        linestyle={"0.01": ":", "0.05": "-.", "0.3": "--"}.get(density, "-"), alpha=0.8,
                        label=f"{row}{f' lr {lr:g}' if len(lrs_of[row]) > 1 else ''} ({len(runs)})")
        if task in base:
            for a in (ax, curves):
                a.axhline(base[task]["final_reward"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(min(counts) / 1.6, max(counts) * 1.6)  # one scale for every task
        ax.set_xlabel("trained entries (rows at one count spread sideways)")
        ax.set_ylabel("final held-out reward")
        ax.set_title(f"{task}: final held-out reward (bars: 95% CI; dots: seeds; dotted: base;\n"
                     "triangles: a mask at its own larger lr)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        curves.set_xlabel("step")
        curves.set_ylabel("held-out reward, mean over seeds")
        curves.set_title(f"{task}: mean curves (density 1% dotted, 5% dash-dot, 10% solid, 30% dashed)", fontsize=9)
        curves.grid(alpha=0.3)
        curves.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
