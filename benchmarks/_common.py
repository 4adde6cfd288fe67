"""Helpers shared by the benchmark scripts: one process per measurement, resident-memory readings, stand-ins for
training, result files.

Peak RSS is a per-process number, so a benchmark that compares configurations runs each one in a child process
(``run_child``) that reports a JSON dict with ``emit_result``. Scripts import this module as ``_common`` (running
``python benchmarks/bench_x.py`` puts ``benchmarks/`` on ``sys.path``); tests import the stand-ins for training as
``benchmarks._common`` (benchmarks never import from tests).
"""

from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RESULT_PREFIX = "BENCH-RESULT "
RESULTS_DIR = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------------------------ memory
def status_mib(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak since start or
    since ``reset_peak``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next RSS reading
    counts live memory rather than set-up garbage."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_free_mib() -> float | None:
    """Bytes glibc's malloc holds free inside its heaps (``mallinfo2().fordblks``): memory the process freed but did
    not hand back to the OS, so it still counts in RSS once touched (fragmentation, allocator slack). None without
    glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2().fordblks / 2**20
    except (OSError, AttributeError):
        return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_average() -> float:
    """One-minute load average: timings from a shared machine are only comparable at similar load."""
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------ processes
def emit_result(result: dict) -> None:
    """Print a child's result as one marked JSON line (libraries may print their own lines to stdout too)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(command: Sequence[str], threads: int | None = 1, timeout: float | None = None,
              env_extra: dict[str, str] | None = None) -> dict:
    """Run ``command`` (usually ``[sys.executable, __file__, "--child", ...]``) and return the dict it passed to
    ``emit_result``. ``threads`` pins OpenMP/MKL threads in the child (on a shared 2-core machine one thread is
    steadier and faster than two); ``env_extra`` adds variables read at the child's start (e.g. glibc's malloc
    tunables); a failed child raises with the tail of its stderr."""
    env = dict(os.environ) | (env_extra or {})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, timeout=timeout)
    results = [line[len(RESULT_PREFIX):] for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"child {' '.join(command[1:])} exited with {done.returncode} and "
                           f"{'no' if not results else 'a'} result; stderr tail:\n{tail}")
    return json.loads(results[-1])


def child_command(script: str, *args: object) -> list[str]:
    """``[python, script, *args]`` with every argument as a string."""
    return [sys.executable, script, *(str(a) for a in args)]


# ------------------------------------------------------------------------------------------------ data
def preference_dataset(n: int):
    """``n`` fixed DPO pairs (prompt / chosen / rejected) on single-digit addition: the right sum against sum + 1."""
    from datasets import Dataset

    rows = [(i % 10, (3 * i + 1) % 10) for i in range(n)]
    return Dataset.from_dict({
        "prompt": [f"What is {a} + {b}?" for a, b in rows],
        "chosen": [f" {a + b}" for a, b in rows],
        "rejected": [f" {a + b + 1}" for a, b in rows],
    })


# ------------------------------------------------------------------------------------- stand-ins for training
def perturb_selected(model, mask, scale: float = 1.0, seed: int = 0):
    """Stand-in for sparse training: adds ``scale`` x N(0, 1) to the entries ``mask`` selects, in place, and touches
    nothing else. Returns ``model``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in mask:
            flat = params[name].view(-1)
            index = mask.flat_indices(name)
            flat[index] += (scale * torch.randn(index.numel(), generator=generator)).to(flat.dtype)
    return model


def perturb_share(model, share: float, size: float, seed: int = 0):
    """Stand-in for dense finetuning: moves a random ``share`` of the entries of every tensor by N(0, ``size``²), in
    place. Returns ``model``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            moved = torch.rand(param.shape, generator=generator) < share
            param += size * torch.randn(param.shape, generator=generator) * moved
    return model


# ------------------------------------------------------------------------------------------------ output
def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys, in column order) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_result(text: str, path: Path, write: bool = True) -> None:
    """Print a result (markdown, CSV) and, unless ``write`` is False, save it to ``path``."""
    print(text)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def cpu_description() -> str:
    """The CPU's model name, marked "(AVX-512)" when it has AVX-512F (the masked AdamW block path needs it): figures
    from machines of the same kind differ by that."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    return name + (" (AVX-512)" if "avx512f" in info else " (no AVX-512)")
