"""CPU time of one shared-reference swap (in and out) on SmolLM2-135M at a 10% random mask: the in-place numba pass
that ``SharedReference`` uses on CPU against the ``index_select``/``index_copy_`` path it uses on other devices.

    python benchmarks/bench_reference_swap.py     # prints the median of 5 rounds of each, 1 torch thread
"""

from __future__ import annotations

import statistics
import time

import torch

from sparse_rl import reference as module
from sparse_rl.discovery import random_mask
from sparse_rl.models import load_smollm2
from sparse_rl.reference import SharedReference


def swap_seconds(reference: SharedReference, rounds: int = 5) -> float:
    with reference.swapped():  # warm-up (numba compiles on first use)
        pass
    times = []
    for _ in range(rounds):
        start = time.process_time()
        with reference.swapped():
            pass
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_smollm2()
    reference = SharedReference(model, random_mask(model, 0.1))
    in_place = swap_seconds(reference)
    original, module._swap_in_place = module._swap_in_place, lambda *args: False
    try:
        scratch = swap_seconds(reference)
    finally:
        module._swap_in_place = original
    print(f"swap in + out, 10% of SmolLM2-135M ({reference.mask.num_selected:,} entries), CPU s: "
          f"in place (numba) {in_place:.3f}, index_select/index_copy_ {scratch:.3f}")


if __name__ == "__main__":
    main()
