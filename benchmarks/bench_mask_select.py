"""Memory and time of drawing a mask on SmolLM2-135M (fp32): ``torch.topk`` per tensor against sparse_rl's chunked
radix select (``sparse_rl.discovery.select``), and how many entries the two choose differently.

Each (selector, mask) measurement runs in its own process: the model is loaded, ``VmHWM`` is reset, the mask is drawn,
and the peak above the resident memory before drawing is reported. ``topk`` is the selection sparse_rl used before
(``torch.topk(scores, k)`` on each whole tensor). The difference count compares the two selectors' masks for the same
scores: they can differ only among entries tied at a tensor's threshold (topk's choice among ties is
implementation-defined; the radix select takes the lowest indices).

    python benchmarks/bench_mask_select.py          # writes benchmarks/results/mask_select.md
"""

from __future__ import annotations

import argparse
import platform
import time

from _common import (
    RESULTS_DIR,
    child_command,
    emit_result,
    load_average,
    release_memory,
    reset_peak,
    run_child,
    status_mib,
    write_result,
)

RESULTS = RESULTS_DIR / "mask_select.md"
SELECTORS = ("topk", "radix")
MASKS = ("random", "magnitude")


def topk_selection(scores, density: float):
    """sparse_rl's selection before the radix select: ``torch.topk`` on the whole tensor."""
    import torch

    from sparse_rl.discovery import selected_count

    flat = scores.reshape(-1)
    k = selected_count(flat.numel(), density)
    selection = torch.zeros(flat.numel(), dtype=torch.bool)
    if k == flat.numel():
        selection[:] = True
    else:
        selection[torch.topk(flat.float().cpu(), k, sorted=False).indices] = True
    return selection.reshape(scores.shape)


def draw(model, selector: str, mask: str, density: float, seed: int):
    from sparse_rl.discovery import magnitude_mask, random_mask, strategies

    original = strategies._top_k_selection
    if selector == "topk":
        strategies._top_k_selection = topk_selection
    try:
        if mask == "random":
            return random_mask(model, density, seed=seed)
        return magnitude_mask(model, density)
    finally:
        strategies._top_k_selection = original


def child(selector: str, mask: str, density: float) -> dict:
    import torch

    from sparse_rl.models import load_smollm2

    torch.set_num_threads(1)
    model = load_smollm2()[0]
    release_memory()
    before = status_mib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    drawn = draw(model, selector, mask, density, seed=0)
    seconds = time.perf_counter() - started
    return {"selector": selector, "mask": mask, "rss_before_mib": before, "peak_mib": status_mib("VmHWM"),
            "rise_mib": status_mib("VmHWM") - before, "seconds": seconds,
            "selected": sum(drawn.count(n) for n in drawn)}


def differences(density: float, seeds: tuple[int, ...]) -> list[dict]:
    import torch

    from sparse_rl.models import load_smollm2

    torch.set_num_threads(1)
    model = load_smollm2()[0]
    rows = []
    for mask, seed in [("random", s) for s in seeds] + [("magnitude", 0)]:
        old, new = (draw(model, selector, mask, density, seed) for selector in SELECTORS)
        changed = {name: int((old[name] != new[name]).sum()) // 2 for name in old}
        rows.append({"mask": mask, "seed": seed, "selected": sum(new.count(n) for n in new),
                     "moved": sum(changed.values()), "tensors": sum(1 for v in changed.values() if v),
                     "where": sorted(((v, n) for n, v in changed.items() if v), reverse=True)[:3]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--child", nargs=2, metavar=("SELECTOR", "MASK"))
    parser.add_argument("--differences", action="store_true", help="child: count entries the selectors choose apart")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        emit_result(child(*args.child, args.density))
        return
    if args.differences:
        emit_result({"rows": differences(args.density, tuple(args.seeds))})
        return
    load = load_average()
    script = __file__
    measured = {(s, m): run_child(child_command(script, "--child", s, m, "--density", args.density))
                for m in MASKS for s in SELECTORS}
    diff = run_child(child_command(script, "--differences", "--density", args.density, "--seeds", *args.seeds))
    lines = ["# Drawing a mask: torch.topk against the chunked radix select", "",
             "```", f"python benchmarks/bench_mask_select.py --density {args.density:g}", "```", "",
             f"SmolLM2-135M-Instruct fp32, density {args.density:g} per tensor, one thread, one process per row; "
             f"{platform.processor() or platform.machine()} (AMD EPYC, AVX-512 on the machine this was run on), "
             f"load average {load:.1f} at the start (the machine was shared: times are indicative, memory is not "
             "affected). *peak rise*: VmHWM while drawing minus the RSS before (model loaded).", "",
             "| mask | selector | peak rise MiB | seconds | selected | peak rise vs topk |",
             "|---|---|---|---|---|---|"]
    for m in MASKS:
        base = measured[("topk", m)]["rise_mib"]
        for s in SELECTORS:
            r = measured[(s, m)]
            lines.append(f"| {m} | {s} | {r['rise_mib']:.0f} | {r['seconds']:.2f} | {r['selected']} | "
                         f"{r['rise_mib'] / base:.2f}x |")
    lines += ["", "Entries the two selectors choose differently (each moved entry counted once: one in, one out):", "",
              "| mask | seed | selected | entries moved | tensors with a move | largest |", "|---|---|---|---|---|---|"]
    for r in diff["rows"]:
        where = ", ".join(f"{n} ({v})" for v, n in r["where"]) or "-"
        lines.append(f"| {r['mask']} | {r['seed']} | {r['selected']} | {r['moved']} | {r['tensors']} | {where} |")
    write_result("\n".join(lines) + "\n", RESULTS, write=not args.no_write)


if __name__ == "__main__":
    main()
