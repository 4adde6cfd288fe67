"""bench_sparsify_memory's table: the vs-LoRA column divides each GRPO row's process peak by the LoRA row's of the
same mmap-threshold setting, and a run without such a LoRA row (``--cases`` without grpo-lora) prints '-'."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_sparsify_memory import table  # noqa: E402


def _row(case: str, fixed: bool, before_train: float, in_train: float, cpu=None) -> dict:
    row = {"case": case, "trim": True, "fixed_mmap_threshold": fixed, "rss_before_sparsify_mib": 1000.0,
           "rss_after_sparsify_mib": 1100.0, "peak_before_train_mib": before_train, "peak_train_mib": in_train,
           "rss_end_mib": 1200.0, "cpu_seconds_per_step": 2.0}
    return row if cpu is None else {**row, "sparsify_cpu_seconds": cpu}


def _versus(text: str, case: str, fixed: bool) -> str:
    setting = "fixed 128 KiB" if fixed else "dynamic"
    line = next(line for line in text.splitlines() if line.startswith(f"| {case} |") and f"| {setting} |" in line)
    return line.rstrip(" |").rsplit("| ", 1)[1]


def test_peak_is_divided_by_the_lora_peak_of_the_same_threshold():
    rows = [_row("grpo-gradient-probe-4-passes", False, 4000.0, 3000.0, cpu=186.4),
            _row("grpo-gradient-probe-4-passes", True, 3000.0, 2000.0, cpu=220.0),
            _row("grpo-lora", False, 1000.0, 2000.0), _row("grpo-lora", True, 1000.0, 2500.0)]
    text = table(rows)
    assert _versus(text, "grpo-gradient-probe-4-passes", False) == "2.00x"  # 4000 / max(1000, 2000)
    assert _versus(text, "grpo-gradient-probe-4-passes", True) == "1.20x"  # 3000 / 2500, not / 2000
    assert _versus(text, "grpo-lora", True) == "1.00x"
    assert "| 186 | 2.0 |" in text  # the probe's CPU seconds beside the CPU s/step


def test_without_a_lora_row_the_ratio_is_a_dash():
    text = table([_row("grpo-gradient-probe", False, 4000.0, 3000.0), _row("grpo-lora", True, 1000.0, 2500.0)])
    assert _versus(text, "grpo-gradient-probe", False) == "-"
    assert "| - | 2.0 | - |" in text  # no sparsify CPU seconds recorded either
