"""Which runs the experiment needs, in the order that decides the most first.

The plan is recomputed from the finished runs every time a process slot frees up, because later runs depend on
earlier ones: a row's seeds 1.. use the learning rate its sweep found best, post-hoc masks need the full run of the
same seed, the second task uses the two best masks at 10%. Stages, in order:

A. learning-rate sweep, seed 0, for the four rows that decide the choice: full finetuning, sparse 10% random,
   sparse 10% gradient probe, LoRA at sparse 10%'s trained count (the middle lr of every row first);
B. those four rows at their best lr with seeds 1, 2;
C. the other masks at 10% (Fisher probe, smallest |w|, post-hoc diff of the full run), 3 seeds (a finished full
   run whose final weights are missing, e.g. swept on another machine, is rerun to rewrite them);
D. the second task: base reward, then full, LoRA and sparse 10% with the two best masks at 10% plus random (the
   baseline every mask is compared with), 3 seeds;
E. gradient probe and random at 1, 5 and 30%, 3 seeds;
H. the lr sweep (seed 0, widened like A's) of Fisher, smallest |w| and post-hoc at 10%, which C ran at the probe's
   lr; where a mask's own best differs, seeds 1, 2 at it (the C row stays: both are reported);
G. LoRA rank 16; top-20%-entropy tokens on full finetuning and on sparse 10% (gradient probe), 3 seeds;
J. the second task with the two best 10% masks of the main task each at its own lr (H's sweeps can reorder the
   masks D chose from at the probe's lr), 3 seeds; a post-hoc mask first reruns the second task's full runs for
   their final weights;
K. the lr sweep (seed 0, widened like A's) of the two entropy rows, which G ran at the lr of the row they restrict;
   where a row's own best differs, seeds 1, 2 at it;
I. seeds 3, 4 of the probe's and the random 10% mask on the main task (their paired difference was unresolved
   with 3 seeds, because random's seeds spread widely);
L. the post-hoc 10% mask cut from the *other* task's full run (same seed), at post-hoc's own lr, 3 seeds, the
   second task first: whether one full run's mask serves another task;
M. the lr sweep (seed 0, widened like A's) of the probe at 1 and 5%, which E ran at its 10% lr, and seeds 1, 2 at
   its own best where that differs (a 1% Fisher mask at 3x that lr matched the 10% probe: the density axis may be
   an lr effect);
O. the second task with the probe's and Fisher's 1% masks, each at its own 1% lr on the main task, 3 seeds;
P. the second task with the probe's 5% mask at its own 5% lr (stage M), 3 seeds: the candidate default density;
N. the lr sweep (seed 0, widened like A's) of random at 1 and 30%, which E ran at its 10% lr, and seeds 1, 2 at
   its own best where that differs;
Q. the second task at twice the steps (``LONGER``), 3 seeds of full finetuning, the matched-count LoRA and the
   probe's 5% mask (the default), each at the lr of its 60-step row: full finetuning's reward on the second task was
   still rising between steps 40 and 60, and issue 18 asks for longer runs where it is;
F. Fisher, smallest |w| and post-hoc at 1, 5 and 30%, each at its own lr from H, 3 seeds (27 runs that
   refine the density axis for masks that the 10% rows already rank); post-hoc with diff_mask's "moved" fill (the
   entries nearest to changing in bf16 fill what the diff leaves short of the density), at 10% too (3 more runs).
   Post-hoc's 10% rerun first (does its lead over random survive the new fill), then 5% (the default's density);
   1% and 30% after stages R and S;
R. the default (the probe's 5% mask) on the second task at stage Q's length, seed 0 at the two neighbours of its lr
   on the 1-3-10 grid, then seeds 1, 2 at whichever beats its lr at seed 0: its lr rule comes from protocol-length
   sweeps, and in stage Q it had the lowest point estimate of the three rows;
S. post-hoc at 1 and 5% (moved fill) with the changed entries ranked by their move before rounding (diff_mask's
   ``rank_changed="moved"``), at post-hoc's own lr, 3 seeds: every post-hoc row before ranked them by the rounded
   |Δ|, whose bf16 ties went by lowest index (66% of the 1% mask on addition's seed-0 full run). Before F's 1 and
   30% rows (which it joins late: F's 1% post-hoc row showed the problem);
T. the lr sweep (seed 0, widened like A's) of Fisher, smallest |w| and post-hoc (moved fill) at 30%, which F ran at
   their 10% lr, and seeds 1, 2 at their own best where that differs: random's own 30% lr was 10x below its 10% one
   (stage N), and Fisher's 30% at its 10% lr rose to 0.768 at step 20 and fell to 0.483 on one seed.

Rows without a sweep of their own take the best lr of their family's swept row: random masks at every density
the 10% random row's (random wants a ~10x larger lr than a probe mask, so the probe's lr would be unfair to it);
Fisher, smallest |w| and post-hoc the probe's in C and D (the second task's choice of masks keeps that rule), their
own from H in J and F; LoRA rank 16 the matched-count LoRA's; entropy rows the row they restrict in G, their own
from K. ``extra_seeds`` adds
seeds to every main row.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from choosing.runs import MASKS, RunConfig, load_result, weights_path

SWEEPS = {"full": (1e-5, 3e-5, 3e-6), "sparse": (3e-5, 1e-4, 1e-5), "lora": (3e-4, 1e-3, 1e-4)}  # middle first
MAX_WIDENING = 2  # grid points a row's sweep may add beyond its family's three while its best lr sits at an edge
DENSITIES = (0.01, 0.05, 0.1, 0.3)
F_DENSITY_ORDER = (0.1, 0.05, 0.01, 0.3)  # stage F's: the README's open question first, then the default density
S_DENSITIES = (0.01, 0.05)  # where the rank of the changed entries decides most of a post-hoc mask (10%: 6% of it)
MAIN_DENSITY = 0.1
DEFAULT_DENSITY = 0.05  # SparseConfig's default since stage P: stages Q and R train it longer
SEEDS = (0, 1, 2)
OTHER_MASKS = ("fisher", "magnitude", "posthoc")  # the masks without an lr sweep in stage A
LONGER = 2  # stage Q: the second task at this many times the protocol's steps
DECISIVE_EXTRA_SEEDS = (3, 4)  # stage I: the random 10% mask's seeds spread 0.66-0.81, too wide to rank it in 3


@dataclass
class Planned:
    config: RunConfig
    stage: str
    posthoc_source: Path | None = None
    regenerate: bool = False  # a finished full run rerun only to rewrite its lost final weights (post-hoc masks)


@dataclass
class Plan:
    ready: list[Planned] = field(default_factory=list)  # runnable now, in priority order (done ones included)
    waiting: list[str] = field(default_factory=list)  # what cannot be scheduled yet, and why
    best_lr: dict[tuple[str, str], float] = field(default_factory=dict)  # (task, swept row) -> lr
    lora_rank: int = 0
    sweep_lrs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (task, swept row) -> lrs so far


def own_row(mask: str) -> str:
    """The row whose lr a mask uses at every density without its own sweep: its 10% row (swept in stage A for the
    probe and random, in stage H for the others)."""
    return f"sparse-{mask}-{MAIN_DENSITY:g}"


def widen(lrs, best: float) -> float | None:
    """The next lr of the 1-3-10 grid beyond ``best`` when it is the smallest or largest of ``lrs``, else None: a best
    lr at the edge of a sweep says only that the optimum may lie further out."""
    exponent = math.floor(math.log10(best) + 1e-9)
    one = math.isclose(best / 10 ** exponent, 1.0, rel_tol=1e-6)
    if best == min(lrs):
        return float(f"{(3 * 10 ** (exponent - 1)) if one else 10 ** exponent:.0e}")
    if best == max(lrs):
        return float(f"{(3 * 10 ** exponent) if one else 10 ** (exponent + 1):.0e}")
    return None


def trained_count(model_dir, density: float) -> int:
    """Entries a per-tensor mask of ``density`` selects (:func:`selected_count` of every tensor)."""
    from sparse_rl.discovery import WeightSource, selected_count

    with WeightSource(model_dir) as source:
        return sum(selected_count(math.prod(source.shape(n)), density) for n in source.names)


def lora_entries_per_rank(model_dir) -> int:
    """LoRA parameters per unit of rank on every linear projection of the blocks (peft's ``all-linear``)."""
    from sparse_rl.discovery import WeightSource

    with WeightSource(model_dir) as source:
        return sum(sum(source.shape(n)) for n in source.names
                   if n.endswith("proj.weight") and len(source.shape(n)) == 2)


def matched_lora_rank(model_dir, density: float = MAIN_DENSITY) -> int:
    return max(1, round(trained_count(model_dir, density) / lora_entries_per_rank(model_dir)))


def build_plan(protocol: RunConfig, runs_dir: Path, weights_dir: Path, model_dir, tasks=("addition", "subtraction"),
               extra_seeds: int = 0) -> Plan:
    """Every run the experiment needs that can be scheduled given the finished runs in ``runs_dir``, in priority
    order. ``protocol`` carries the sizes (steps, prompts, evaluation); its other fields are ignored."""
    plan = Plan(lora_rank=matched_lora_rank(model_dir))
    seeds = tuple(range(len(SEEDS) + extra_seeds))
    main_task = tasks[0]

    def config(task: str, method: str, lr: float, seed: int, **kw) -> RunConfig:
        return protocol.replace(task=task, method=method, learning_rate=lr, seed=seed, density=kw.get("density"),
                                mask=kw.get("mask"), lora_rank=kw.get("lora_rank"),
                                entropy_quantile=kw.get("entropy_quantile", 1.0),
                                mask_from_task=kw.get("mask_from_task"), steps=kw.get("steps", protocol.steps),
                                posthoc_fill=kw.get("posthoc_fill", "rounded"),
                                posthoc_rank=kw.get("posthoc_rank", "rounded"))

    def done(c: RunConfig) -> dict | None:
        return load_result(runs_dir, c)

    rows = {  # swept rows: (method, extra fields, sweep family)
        "full": ("full", {}, "full"),
        f"sparse-random-{MAIN_DENSITY:g}": ("sparse", {"mask": "random", "density": MAIN_DENSITY}, "sparse"),
        f"sparse-gradient-{MAIN_DENSITY:g}": ("sparse", {"mask": "gradient", "density": MAIN_DENSITY}, "sparse"),
        f"lora-r{plan.lora_rank}": ("lora", {"lora_rank": plan.lora_rank}, "lora"),
    }
    planned: set[str] = set()  # run ids in plan.ready (a sweep's point can be another stage's row: plan it once)
    regenerating: set[str] = set()  # finished full runs planned again to rewrite their lost final weights

    def add(p: Planned) -> None:
        planned.add(p.config.run_id())
        plan.ready.append(p)

    for task in tasks:  # the base reward of every task first (cheap; a task outside 0.1-0.8 gives GRPO no signal)
        add(Planned(config(task, "base", 0.0, 0), "0 base"))

    # A: sweeps, widened one grid point at a time while the best lr of a complete sweep sits at its edge
    for i in range(3):
        for method, kw, family in rows.values():
            add(Planned(config(main_task, method, SWEEPS[family][i], 0, **kw), "A lr sweep"))

    def schedule(c: RunConfig, stage: str) -> bool:
        """Plan ``c`` once; a post-hoc run first needs the final weights of the full run of its seed (rerun once when
        they are lost). False when it has to wait."""
        if c.run_id() in planned:
            return True
        source = None
        if c.mask == "posthoc" and done(c) is None:  # a finished run needs no weights any more
            full_lr = plan.best_lr.get((main_task, "full"))
            if full_lr is None:
                plan.waiting.append(f"{c.row} lr {c.learning_rate:g} seed {c.seed} ({stage}): waits for full "
                                    "finetuning's lr sweep (its best run's weights give the post-hoc mask)")
                return False
            full_run = config(c.mask_from_task or c.task, "full", full_lr, c.seed)
            source, full_finished = weights_path(weights_dir, full_run), done(full_run) is not None
            if not full_finished or not source.exists():
                plan.waiting.append(f"{c.row} lr {c.learning_rate:g} seed {c.seed} ({stage}): waits for the full "
                                    f"run of seed {c.seed} at its best lr (its final weights give the post-hoc mask)")
                if full_finished and full_run.run_id() not in regenerating:  # finished, weights gone
                    regenerating.add(full_run.run_id())  # (another machine's work folder): rerun it once
                    add(Planned(full_run, stage, regenerate=True))
                return False
        add(Planned(c, stage, source))
        return True

    def sweep(name: str, method: str, kw: dict, family: str, stage: str) -> None:
        """Seed 0 of ``name`` at its family's lrs (scheduled by the caller or here), widened one 1-3-10 grid point
        at a time while the best sits at an edge; sets ``plan.best_lr`` once complete."""
        lrs = list(SWEEPS[family])
        while True:
            results = {lr: done(config(main_task, method, lr, 0, **kw)) for lr in lrs}
            plan.sweep_lrs[(main_task, name)] = sorted(lrs)
            if not all(results.values()):
                plan.waiting.append(f"{main_task} {name}: the runs at its own best lr wait for its lr sweep "
                                    f"({sum(map(bool, results.values()))}/{len(lrs)} done)")
                return
            best = max(results, key=lambda lr: results[lr]["final_reward"])
            wider = widen(lrs, best)
            if wider is None or len(lrs) >= len(SWEEPS[family]) + MAX_WIDENING:
                plan.best_lr[(main_task, name)] = best
                return
            lrs.append(wider)
            schedule(config(main_task, method, wider, 0, **kw), f"{stage} (widened)")

    for name, (method, kw, family) in rows.items():
        sweep(name, method, kw, family, "A lr sweep")

    def lr_of(row: str) -> float | None:
        return plan.best_lr.get((main_task, row))

    sparse_row, lora_row = f"sparse-gradient-{MAIN_DENSITY:g}", f"lora-r{plan.lora_rank}"
    random_row = f"sparse-random-{MAIN_DENSITY:g}"

    def mask_row(mask: str) -> str:
        """The swept row whose lr a mask's rows use (in stages C and D; stage H sweeps the other masks' own)."""
        return random_row if mask == "random" else sparse_row

    def moved_fill(mask: str) -> dict:
        """Stage F's and T's post-hoc masks fill with the entries nearest to changing; other masks have no fill."""
        return {"posthoc_fill": "moved"} if mask == "posthoc" else {}

    def cut_by_move(mask: str) -> dict:
        """Stage S's and U's post-hoc masks also rank their changed entries by the move before rounding."""
        return {**moved_fill(mask), "posthoc_rank": "moved"} if mask == "posthoc" else {}

    def best_two_masks(lr_row) -> list | None:
        """The main task's two best 10% masks, each at the lr of ``lr_row(mask)`` (see ``_best_masks``)."""
        def seed0(mask: str) -> RunConfig | None:
            lr = lr_of(lr_row(mask))
            return None if lr is None else config(main_task, "sparse", lr, 0, mask=mask, density=MAIN_DENSITY)
        return _best_masks(runs_dir, main_task, seeds, seed0)

    def add_seeds(task: str, stage: str, method: str, lr_row: str, seeds=seeds, **kw) -> None:
        lr = lr_of(lr_row)
        if lr is None:
            plan.waiting.append(f"{task} {config(task, method, 1.0, 0, **kw).row} ({stage}): waits for the lr "
                                f"sweep of {lr_row}")
            return
        for seed in seeds:
            schedule(config(task, method, lr, seed, **kw), stage)

    # B: the decisive rows with more seeds
    for name, (method, kw, _) in rows.items():
        add_seeds(main_task, "B seeds", method, name, seeds=seeds[1:], **kw)
    # C: the other masks at 10%
    for mask in OTHER_MASKS:
        add_seeds(main_task, "C masks at 10%", "sparse", sparse_row, mask=mask, density=MAIN_DENSITY)
    # D: second task
    best_masks = best_two_masks(mask_row)
    for task in tasks[1:]:
        add_seeds(task, "D second task", "full", "full")
        add_seeds(task, "D second task", "lora", lora_row, lora_rank=plan.lora_rank)
        if best_masks is None:
            plan.waiting.append(f"{task} sparse 10%: waits for every 10% mask of {main_task} to have "
                                f"{len(seeds)} seeds (it uses the best two, and random as the baseline)")
        else:
            # the best mask, then random (their paired difference is the question a part-done sweep answers
            # first), then the second best
            order = [best_masks[0]] + ["random"] * ("random" not in best_masks) + best_masks[1:]
            for mask in order:
                add_seeds(task, "D second task", "sparse", mask_row(mask), mask=mask, density=MAIN_DENSITY)
    # E: density axis for the probe and random
    for density in DENSITIES:
        if density != MAIN_DENSITY:
            for mask in ("gradient", "random"):
                add_seeds(main_task, "E densities", "sparse", mask_row(mask), mask=mask, density=density)
    def own_sweep(name: str, method: str, kw: dict, inherited_row: str, sweep_stage: str, seeds_stage: str) -> None:
        """A row that first ran at ``inherited_row``'s lr gets its own seed-0 sweep (the inherited lr's run is its
        seed 0 there), then seeds 1, 2 at its own best lr where that differs (both rows are reported)."""
        for lr in SWEEPS[method]:  # the family of a row is its method
            schedule(config(main_task, method, lr, 0, **kw), sweep_stage)
        sweep(name, method, kw, method, sweep_stage)
        if lr_of(name) is not None and lr_of(name) != lr_of(inherited_row):
            add_seeds(main_task, seeds_stage, method, name, seeds=seeds[1:], **kw)

    # H: each other mask's own lr sweep at 10%
    for mask in OTHER_MASKS:
        own_sweep(f"sparse-{mask}-{MAIN_DENSITY:g}", "sparse", {"mask": mask, "density": MAIN_DENSITY}, sparse_row,
                  "H lr sweep of the other masks", "H other masks at their own lr")
    # G: LoRA rank 16, high-entropy tokens
    add_seeds(main_task, "G", "lora", lora_row, lora_rank=16)
    add_seeds(main_task, "G", "full", "full", entropy_quantile=0.2)
    add_seeds(main_task, "G", "sparse", sparse_row, mask="gradient", density=MAIN_DENSITY, entropy_quantile=0.2)
    # J: the second task again with the two best 10% masks, each at its own lr (D chose with Fisher, smallest |w|
    # and post-hoc at the probe's lr; their own sweeps in H can change the ranking); a mask D already ran at that lr
    # adds nothing
    best_own = best_two_masks(own_row)
    for task in tasks[1:]:
        if best_own is None:
            plan.waiting.append(f"{task} sparse 10% at each mask's own lr (J): waits for every 10% mask of "
                                f"{main_task} to have {len(seeds)} seeds at its own lr")
            continue
        for mask in best_own:
            add_seeds(task, "J second task, masks at their own lr", "sparse", own_row(mask), mask=mask,
                      density=MAIN_DENSITY)
    # K: the entropy rows' own lr sweep (G ran them at the lr of the row they restrict: with the loss gradient of 20%
    # of the tokens a row may want another)
    own_sweep("full-entropy0.2", "full", {"entropy_quantile": 0.2}, "full", "K lr sweep of the entropy rows",
              "K entropy rows at their own lr")
    own_sweep(f"{sparse_row}-entropy0.2", "sparse", {"mask": "gradient", "density": MAIN_DENSITY,
                                                      "entropy_quantile": 0.2}, sparse_row,
              "K lr sweep of the entropy rows", "K entropy rows at their own lr")
    # I: two more seeds for the question 3 seeds left open: does the probe's 10% mask beat a random one
    for mask in ("gradient", "random"):
        add_seeds(main_task, "I more seeds", "sparse", mask_row(mask), seeds=DECISIVE_EXTRA_SEEDS, mask=mask,
                  density=MAIN_DENSITY)
    # L: does one task's post-hoc mask train the other as well as its own? (the masks share half their moved entries
    # across tasks; if so one full run serves several tasks) Same seed's full run, post-hoc's own lr, both directions
    posthoc_row = own_row("posthoc")
    for source, task in itertools.permutations(tasks[:2], 2):  # the second task first
        add_seeds(task, "L post-hoc mask from the other task", "sparse", posthoc_row, mask="posthoc",
                  density=MAIN_DENSITY, mask_from_task=source)
    # M: the probe's own lr at 1% and 5% (E ran them at its 10% lr; a 1% Fisher mask at 3x that lr matched the 10%
    # probe, so the density axis may be an lr effect, and a lower default density would cut optimizer state 10x)
    for density in (0.01, 0.05):
        own_sweep(f"sparse-gradient-{density:g}", "sparse", {"mask": "gradient", "density": density}, sparse_row,
                  "M lr sweep of the probe at 1 and 5%", "M probe at 1 and 5% at its own lr")
    # O: the second task at 1%, the probe and Fisher each at its own 1% lr on the main task (both matched the 10%
    # probe there at a tenth of its optimizer state; a default of 1% needs a second task to agree)
    for task in tasks[1:]:
        add_seeds(task, "O second task at 1%", "sparse", "sparse-gradient-0.01", mask="gradient", density=0.01)
        add_seeds(task, "O second task at 1%", "sparse", own_row("fisher"), mask="fisher", density=0.01)
    # P: the second task at 5%, the probe at its own 5% lr (on the main task its 5% cleared 95% of full
    # finetuning's gain with seeds as steady as 10%: the candidate default density needs a second task to agree)
    for task in tasks[1:]:
        add_seeds(task, "P second task at 5%", "sparse", "sparse-gradient-0.05", mask="gradient", density=0.05)
    # N: random's own lr at 1% and 30% (E ran them at its 10% lr: at 30% that lr fell to 0.641, and F's rows at 1
    # and 30%, each at its own lr, are compared with random at the same density)
    for density in (0.01, 0.3):
        own_sweep(f"sparse-random-{density:g}", "sparse", {"mask": "random", "density": density}, random_row,
                  "N lr sweep of random at 1 and 30%", "N random at 1 and 30% at its own lr")
    # Q: the second task trained twice as long (its full finetuning was still rising at the protocol's last step):
    # does the default (the probe's 5% mask) stay level with full finetuning and LoRA once full finetuning converges?
    # Each row at the lr of its protocol-length row (new runs: the training set is sized to the steps and shuffled,
    # so the batches differ from the first step on), seed by seed, so that a part-done stage already pairs the rows;
    # within a seed the default before LoRA, so two runs at a time pair the default with full finetuning first
    default_row = f"sparse-gradient-{DEFAULT_DENSITY:g}"
    for task, seed in itertools.product(tasks[1:], seeds):
        longer = {"seeds": (seed,), "steps": LONGER * protocol.steps}
        add_seeds(task, "Q second task, longer", "full", "full", **longer)
        add_seeds(task, "Q second task, longer", "sparse", default_row, mask="gradient", density=DEFAULT_DENSITY,
                  **longer)
        add_seeds(task, "Q second task, longer", "lora", lora_row, lora_rank=plan.lora_rank, **longer)
    # F: the other masks at the other densities, each at its own lr (stage H). Post-hoc masks fill the density the
    # bf16 diff leaves short with the entries nearest to changing (diff_mask's "moved"; the lowest-index block of
    # the 10% rows would be most of a 30% mask), at 10% too, so the density axis has one fill throughout. Post-hoc
    # at 10% first (whether its lead over random there survives the new fill), then the default's 5%; stage R
    # comes before 1% and 30%
    def densities(order) -> None:
        for density in order:
            for mask in OTHER_MASKS:
                fill = moved_fill(mask)
                if density != MAIN_DENSITY or fill:
                    add_seeds(main_task, "F densities", "sparse", own_row(mask), mask=mask, density=density, **fill)

    densities(F_DENSITY_ORDER[:2])
    # R: the default's lr at the longer length. Its lr rule (10x full finetuning's) comes from protocol-length
    # sweeps; in stage Q its point estimate was the lowest of the three rows and one seed's curve flattened early, so
    # its neighbours on the 1-3-10 grid at seed 0, then seeds 1, 2 at whichever beats its lr there
    default_lr = lr_of(default_row)
    for task in tasks[1:] if default_lr is not None else ():  # else Q already says it waits for the default's sweep
        kw = {"mask": "gradient", "density": DEFAULT_DENSITY, "steps": LONGER * protocol.steps}
        lower, upper = widen((default_lr, math.inf), default_lr), widen((0.0, default_lr), default_lr)
        lrs = (default_lr, lower, upper)  # its lr and the grid points either side (widen's step from an edge)
        for lr in lrs[1:]:
            schedule(config(task, "sparse", lr, 0, **kw), "R lr sweep of the default, longer")
        results = {lr: done(config(task, "sparse", lr, 0, **kw)) for lr in lrs}
        if not all(results.values()):
            plan.waiting.append(f"{task} {default_row} at {kw['steps']} steps, seeds 1, 2 at its own lr (R): waits "
                                f"for its seed-0 lr sweep ({sum(map(bool, results.values()))}/{len(lrs)} done)")
            continue
        best = max(results, key=lambda lr: results[lr]["final_reward"])
        if best != default_lr:
            for seed in seeds[1:]:
                schedule(config(task, "sparse", best, seed, **kw), "R the default, longer, at its own lr")
    # S: post-hoc below the changed share, its changed entries ranked by their move before rounding: F's ranked them
    # by the rounded |Δ|, so bf16's ties went by lowest index and its 1% row came out far below random's. Before
    # F's 30% rows, which rank nothing (the changed entries are all in)
    for density in S_DENSITIES:
        add_seeds(main_task, "S post-hoc ranked by move", "sparse", own_row("posthoc"), mask="posthoc",
                  density=density, **cut_by_move("posthoc"))
    densities(F_DENSITY_ORDER[2:])
    # T: the other masks' own lr at 30%, last (F ran them at their 10% lr, too high at 30% for random and Fisher),
    # once that lr is known (F's run at it is the sweep's seed 0)
    for mask in (m for m in OTHER_MASKS if lr_of(own_row(m)) is not None):
        kw = {"mask": mask, "density": 0.3, **moved_fill(mask)}
        own_sweep(config(main_task, "sparse", 1.0, 0, **kw).row, "sparse", kw, own_row(mask),
                  "T lr sweep of the other masks at 30%", "T other masks at 30% at their own lr")
    # U: the same at 1%, after T (F and S ran them at their 10% lr, but at 1% the probe's own lr was 3x its 10% one
    # and random's 10x, so a 1% row at the 10% lr may lose by its lr, not its mask); post-hoc cut as stage S's
    for mask in (m for m in OTHER_MASKS if lr_of(own_row(m)) is not None):
        kw = {"mask": mask, "density": 0.01, **cut_by_move(mask)}
        own_sweep(config(main_task, "sparse", 1.0, 0, **kw).row, "sparse", kw, own_row(mask),
                  "U lr sweep of the other masks at 1%", "U other masks at 1% at their own lr")
    return plan


def _best_masks(runs_dir: Path, task: str, seeds, mask_config) -> list | None:
    """The two masks with the highest mean final held-out reward at 10% on ``task``, each at its own lr
    (``mask_config(mask)`` gives its seed-0 run, None while its lr is unknown), once every mask has every seed;
    None before that."""
    means = {}
    for mask in MASKS:
        template = mask_config(mask)
        if template is None:
            return None
        results = [load_result(runs_dir, template.replace(seed=s)) for s in seeds]
        if not all(results):
            return None
        means[mask] = sum(r["final_reward"] for r in results) / len(results)
    return sorted(means, key=means.get, reverse=True)[:2]

