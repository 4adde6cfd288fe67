"""Every Triton kernel variant ``MaskedAdamW`` launches compiles for real GPUs (no GPU needed): A100 (sm_80), H100
(sm_90) and MI300 (gfx942), with no spills and at least half the SM's (CU's) warp slots occupiable at the launch's
num_warps; and what is compiled is what ``MaskedAdamW`` launches.

The compiler runs in a subprocess without ``TRITON_INTERPRET=1`` (under the interpreter the kernels are interpreted
functions, which Triton cannot compile), through :func:`sparse_rl.kernels.aot.check_all`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sparse_rl.kernels import triton_launch as launches
from sparse_rl.kernels.layout import TILE, KernelVariant

from sparse_rl import MaskedAdamW
from tests.test_optim_reference import random_grads, random_problem

pytest.importorskip("triton")
TARGETS = ("sm_80", "sm_90", "gfx942")


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sparse_rl.kernels.aot", "--workers", "2"], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return {(row["variant"], row["target"]): row for row in json.loads(result.stdout.splitlines()[-1])}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant", [v.name for v in KernelVariant.all()])
def test_variant_compiles_without_spills_at_half_occupancy(compiled, variant, target):
    row = compiled[variant, target]
    assert row["error"] is None, row["error"]
    assert row["spill_bytes"] == 0, f"{variant} on {target} spills {row['spill_bytes']} bytes per thread"
    assert row["occupancy"] >= 0.5, (f"{variant} on {target}: {row['registers']} registers per thread at "
                                     f"{row['num_warps']} warps leave occupancy at {row['occupancy']:.0%}")


def test_all_variants_checked(compiled):
    assert len(compiled) == len(KernelVariant.all()) * len(TARGETS) == 28 * 3


def test_compiled_launches_are_the_ones_masked_adamw_makes(monkeypatch):
    """Record the Triton launches of real ``MaskedAdamW`` steps, for every option that changes the kernel, and
    compare them with :func:`sparse_rl.kernels.aot.variant_launch` (what the compile check compiles): the same
    kernel, constexprs, options and num_warps, and argument types."""
    pytest.importorskip("bitsandbytes")
    from sparse_rl.kernels.aot import variant_launch

    seen = {}
    monkeypatch.setattr(launches.TritonLaunch, "run", lambda launch: seen.setdefault("launch", launch))

    def kind(argument):
        return (argument.dtype, argument.dim()) if torch.is_tensor(argument) else type(argument)

    for variant in KernelVariant.all():
        params, mask = random_problem({"w": (2 * TILE + 5,)}, 0.3, variant.param_dtype)
        p = torch.nn.Parameter(params["w"])
        optimizer = MaskedAdamW([("w", p)], mask, master_weights=variant.has_master, state_bits=variant.state_bits,
                                stochastic_rounding=variant.stochastic_rounding, backend="triton")
        grad = random_grads(params, 1)[0]["w"]
        if variant.compact_grad:
            p.compact_grad = grad[mask["w"]]
        else:
            p.grad = grad
        seen.clear()
        optimizer.step()
        made, checked = seen["launch"], variant_launch(variant)
        assert made.kernel is checked.kernel, variant.name
        assert (made.constexprs, made.options, made.num_warps) == (checked.constexprs, checked.options,
                                                                    checked.num_warps), variant.name
        assert [kind(a) for a in made.arguments] == [kind(a) for a in checked.arguments], variant.name
