"""Visiting a mask's selected entries on CPU: int32 positions (4 bytes per selected entry, held for the whole run)
against walking the mask's packed bits (``sparse_rl.restrict.bitscan``: nothing held). The shared reference swaps
twice per reference forward and the compact gradient hooks gather once per backward, so this is their per-step cost.

    python benchmarks/bench_bitscan.py --density 0.1      # SmolLM2-135M's entry count, one thread
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
import torch
from _common import RESULTS_DIR, cpu_description, load_average, write_result

from sparse_rl.restrict import bitscan

ENTRIES = 134_515_008  # SmolLM2-135M-Instruct


@numba.njit(nogil=True)
def _swap_positions(values, positions, other):
    for i in range(positions.shape[0]):
        j = positions[i]
        kept = values[j]
        values[j] = other[i]
        other[i] = kept


def _median_seconds(fn, rounds: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    selection = torch.rand(ENTRIES, generator=torch.Generator().manual_seed(0)) < args.density
    packed = np.packbits(selection.numpy())
    positions = torch.from_numpy(np.flatnonzero(selection.numpy()).astype(np.int32))
    flat = torch.randn(ENTRIES, generator=torch.Generator().manual_seed(1))
    count = positions.numel()
    stored = flat[selection].clone()
    bits, kept = flat.view(torch.int32).numpy(), stored.view(torch.int32).numpy()
    rows = {
        "swap, int32 positions": _median_seconds(lambda: _swap_positions(bits, positions.numpy(), kept), args.rounds),
        "swap, packed bits": _median_seconds(lambda: bitscan.swap_selected(flat, packed, stored), args.rounds),
        "gather, index_select on int32 positions": _median_seconds(
            lambda: torch.index_select(flat, 0, positions), args.rounds),
        "gather, packed bits": _median_seconds(lambda: bitscan.gather_selected(flat, packed, count), args.rounds),
    }
    lines = [f"# Visiting {count:,} selected entries of {ENTRIES:,} (density {args.density:g}), one thread", "",
             f"{cpu_description()}, 1-minute load average {load_average():.1f}; median of {args.rounds} rounds. Held "
             f"between steps: int32 positions {4 * count / 2**20:.1f} MiB, packed bits 0 (the mask's own "
             f"{packed.nbytes / 2**20:.1f} MiB).", "", "| operation | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.4f} |" for name, seconds in rows.items()]
    lines += ["", f"Reproduce: `python benchmarks/bench_bitscan.py --density {args.density:g} --rounds {args.rounds}`",
              ""]
    write_result("\n".join(lines), RESULTS_DIR / "bitscan.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
