"""``benchmarks/gpu_check.py`` (``make gpu-check``): its dry run writes every row of the report, so the GPU script
cannot rot on machines without a GPU, and without CUDA the real run refuses with its own exit code."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DENSITIES = ("1%", "5%", "10%", "30%")
MASKED_PROVIDERS = ("MaskedAdamW fp32, compact gradients", "MaskedAdamW fp32, dense gradients",
                    "MaskedAdamW fp32, 8-bit state, compact gradients",
                    "MaskedAdamW bf16 + fp32 master, compact gradients")


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it (dry run) or clears it (GPU run) itself
    # run from another folder: the script must not depend on the working directory
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _table(report: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first markdown table after ``heading``, as dicts keyed by the header cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    header = cells(lines[first])
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


def _number(text: str) -> float:
    return float(text.rstrip("x").replace(",", "").split()[0])


def test_dry_run_writes_every_row(tmp_path):
    output = tmp_path / "report.md"
    done = _run(["--dry-run", "--output", str(output)], tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    assert "- Device: CPU dry run" in report and "triton " in report and "torch " in report
    assert "## Errors" not in report

    checks = _table(report, "## 1.")
    names = [row["check"] for row in checks]
    assert len(checks) >= 27 and all(row["result"] == "pass" for row in checks), checks
    for expected in ("bit-exact vs reference: float32, dense gradients",
                     "bit-exact vs reference: bfloat16, master copy, compact gradients",
                     "bit-exact vs reference: float16, compact gradients",
                     "bit-exact vs reference: random sizes and densities",
                     "stochastic rounding vs CPU path: bfloat16, dense gradients",
                     "8-bit state vs CPU path: bfloat16, master copy, compact gradients",
                     "MaskedAdamW vs torch.optim.AdamW on the selected entries",
                     "state_dict round trip on the device: bf16, 8-bit state"):
        assert expected in names
    for row in checks:  # the comparisons are not vacuous: selected entries moved
        if row["check"].startswith(("bit-exact vs reference: float", "bit-exact vs reference: bfloat")):
            assert _number(row["detail"].split(", ")[-1].split(" moved")[0].split()[-1]) > 0, row

    steps = _table(report, "## 2.")
    by_key = {(row["optimizer"], row["density"]): row for row in steps}
    for provider in ("torch AdamW fused, fp32", "torch AdamW fused, bf16 (bf16 moments)"):
        assert (provider, "dense") in by_key
    if "bitsandbytes not installed" not in report:
        assert ("bitsandbytes AdamW8bit, fp32 weights", "dense") in by_key
    assert _number(by_key["torch AdamW fused, fp32", "dense"]["B moved / param"]) == 28.0
    for provider in MASKED_PROVIDERS:
        moved = []
        for density in DENSITIES:
            row = by_key[provider, density]
            assert math.isfinite(_number(row["step (ms)"])) and _number(row["step (ms)"]) > 0
            assert _number(row["GB/s"]) >= 0 and _number(row["of copy"]) >= 0
            moved.append(_number(row["B moved / param"]))
        assert moved == sorted(moved) and moved[-1] < 28.0, (provider, moved)  # more density, more traffic

    grpo = {row["setup"]: row for row in _table(report, "## 3.")}
    assert set(grpo) == {"full", "sparse 10%", "LoRA"}
    share = {setup: float(row["trained entries"].split("(")[1].rstrip("%)")) for setup, row in grpo.items()}
    assert share["full"] == 100.0 and 9.5 < share["sparse 10%"] < 10.5 and 5 < share["LoRA"] < 15
    for row in grpo.values():
        assert _number(row["peak in train() (MiB)"]) > 0 and _number(row["step (s)"]) > 0
        assert 0.0 <= _number(row["mean reward"]) <= 1.0
    changed = {setup: _number(row["bf16 entries changed"]) for setup, row in grpo.items()}
    assert changed["full"] > 0 and changed["sparse 10%"] > 0 and changed["LoRA"] == 0  # training moved the weights
    assert grpo["sparse 10%"]["bf16 entries changed"].endswith("outside the mask: 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_cuda_it_says_so_and_exits_nonzero(tmp_path):
    output = tmp_path / "report.md"
    done = _run(["--output", str(output)], tmp_path, timeout=600)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "no CUDA device is available" in done.stderr and "--dry-run" in done.stderr
    assert not output.exists()


def test_device_check_fails_when_the_kernel_disagrees_with_the_reference(tmp_path):
    """The bit-exact comparison is not vacuous: against a reference off by one fp32 rounding of eps it fails, naming
    the tensor, and against the real reference it passes (run in a child: the script sets TRITON_INTERPRET itself)."""
    code = f"""
import sys
sys.argv = ["gpu_check.py", "--dry-run"]
sys.path.insert(0, {str(SCRIPT.parent)!r})
import torch
import gpu_check

ref = gpu_check._load_tests_module("test_optim_reference")
device = gpu_check.Device(dry_run=True)
params, mask = ref.random_problem({{"w": (37, 50), "v": (1500,)}}, 0.3, torch.bfloat16)
grads = ref.random_grads(params, 2)
print("moved", gpu_check._against_reference(ref, device, params, mask, grads, compact=True))

class OffByEps(ref.ReferenceMaskedAdamW):
    def __init__(self, *args, eps, **kwargs):
        super().__init__(*args, eps=eps * 1.5, **kwargs)

ref.ReferenceMaskedAdamW = OffByEps
try:
    gpu_check._against_reference(ref, device, params, mask, grads, compact=True)
except AssertionError as error:
    print("caught", error)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert int(next(line for line in lines if line.startswith("moved")).split()[1]) > 0
    caught = next((line for line in lines if line.startswith("caught")), "")
    # bf16 rounding hides some of it in the weights; the fp32 master copy shows it
    assert "entries differ" in caught and re.search(r"(param|of) [wv]:", caught), done.stdout[-2000:]


def test_a_failing_setup_is_reported_and_exits_1(tmp_path):
    """A section part that raises is named in the report's Errors with its traceback, and the run exits 1."""
    output = tmp_path / "report.md"
    code = f"""
import sys
sys.argv = ["gpu_check.py", "--dry-run", "--sections", "grpo", "--output", {str(output)!r}]
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check

def grpo_run(device, sizes, setup, workdir):
    raise RuntimeError(f"no GPU memory left for {{setup}}")

gpu_check.grpo_run = grpo_run
sys.exit(gpu_check.main())
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    report = output.read_text()
    for setup in ("full", "sparse 10%", "LoRA"):
        assert f"`grpo: {setup}` raised" in report and f"no GPU memory left for {setup}" in report
