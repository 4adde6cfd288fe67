"""Ahead-of-time compilation of every Triton launch of ``MaskedAdamW`` for real GPU targets, without a GPU.

Triton compiles for a named target (``GPUTarget``) on any machine: PTX and a cubin through the ``ptxas`` shipped in
the triton wheel for NVIDIA, an hsaco for AMD. :func:`compile_launch` compiles a :class:`.triton_launch.TritonLaunch`
exactly as Triton's runtime would before launching it (the same argument binding, specialisation and options), only
for the given target; :func:`resources` reads what the compiled kernel needs per thread and per program, and
:func:`occupancy` what that allows on the target. ``tests/test_kernels_compile.py`` checks every variant with them and
``benchmarks/kernel_compile.py`` reports them.

Needs real ``@triton.jit`` functions: run it in a process without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from .layout import TABLE_COLUMNS, AdamWScalars, KernelVariant
from .triton_launch import TritonLaunch, triton_launch

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),  # A100
    "sm_90": GPUTarget("cuda", 90, 32),  # H100
    "gfx942": GPUTarget("hip", "gfx942", 64),  # MI300
}


def variant_launch(variant: KernelVariant, num_tiles: int = 1) -> TritonLaunch:
    """The launch ``MaskedAdamW`` builds for ``variant`` (over stand-in tables: only their dtypes and alignment, which
    torch's allocations guarantee, enter the compiled code)."""
    table = torch.zeros(1, TABLE_COLUMNS, dtype=torch.int64)
    tiles = torch.zeros(num_tiles, 2, dtype=torch.int32)
    qmaps = (torch.zeros(256), torch.zeros(256)) if variant.state_bits == 8 else None
    scalars = AdamWScalars.for_step(lr=1e-6, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1)
    return triton_launch(table, tiles, scalars, variant, qmaps)


def compile_launch(launch: TritonLaunch, target: GPUTarget):
    """Compile ``launch`` for ``target`` as ``JITFunction.run`` compiles it before a launch (Triton 3.x internals:
    the kernel's binder gives the signature, specialisation and options of these very arguments)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): compile them in a process without it")
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    keywords = dict(launch.constexprs, num_warps=launch.num_warps, **launch.options)
    bound, specialization, options = binder(*launch.arguments, **keywords)
    options, signature, constexprs, attrs = kernel._pack_args(backend, keywords, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass
class Resources:
    registers: int  # per thread (NVIDIA) / VGPRs incl. AGPRs per lane (AMD)
    spill_bytes: int  # local memory (NVIDIA) / scratch (AMD) per thread: > 0 means spills
    shared_bytes: int  # per program
    occupancy: float  # resident warps (wavefronts) per SM (SIMD) over the maximum, at the launch's num_warps


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary (``cuobjdump``, ``nvdisasm``) shipped inside the triton wheel."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvidia_tool("cuobjdump"), flag, file.name], capture_output=True, text=True,
                              check=True).stdout


def resources(compiled, target: GPUTarget, num_warps: int) -> Resources:
    if target.backend == "cuda":
        usage = cuobjdump(compiled.asm["cubin"], "-res-usage")
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        registers, local = int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"])
        shared = int(fields["SHARED"]) + compiled.metadata.shared  # static + the dynamic amount the launch requests
        return Resources(registers, local, shared, occupancy(target, registers, shared, num_warps))
    notes = compiled.asm["amdgcn"]
    registers = _amd_unified_vgprs(_amd_field(notes, ".vgpr_count"), _amd_field(notes, ".agpr_count", default=0))
    local = (_amd_field(notes, ".private_segment_fixed_size") + _amd_field(notes, ".vgpr_spill_count")
             + _amd_field(notes, ".sgpr_spill_count"))
    shared = max(_amd_field(notes, ".group_segment_fixed_size"), compiled.metadata.shared)
    computed = occupancy(target, registers, shared, num_warps)
    # LLVM's AMDGPU backend states the waves per SIMD it allows (registers, LDS, workgroup size): take the lower.
    reported = re.search(r"^; Occupancy: (\d+)", notes, re.MULTILINE)
    return Resources(registers, local, shared, min(computed, int(reported.group(1)) / 8) if reported else computed)


def _amd_field(notes: str, key: str, default: int | None = None) -> int:
    match = re.search(rf"^\s*{re.escape(key)}:\s*(\d+)", notes, re.MULTILINE)
    if match is None:
        if default is None:
            raise ValueError(f"no {key} in the kernel's AMDGPU metadata")
        return default
    return int(match.group(1))


def _amd_unified_vgprs(vgprs: int, agprs: int) -> int:
    """CDNA3 allocates arch VGPRs and AGPRs from one 512-entry file per lane, AGPRs after the VGPRs rounded to 4."""
    return (-(-vgprs // 4) * 4 + agprs) if agprs else vgprs


def occupancy(target: GPUTarget, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps per SM over the SM's maximum (NVIDIA), or wavefronts per SIMD over 8 (AMD CDNA3).

    NVIDIA sm_80/sm_90: 64K registers per SM, allocated per warp in units of 256 (a thread's count rounded up to 8),
    at most 64 warps and 32 programs per SM, shared memory 164 KB (sm_80) / 228 KB (sm_90) per SM plus 1 KB reserved
    per program; programs are resident whole. AMD gfx942: a program's wavefronts spread over the CU's 4 SIMDs, each
    SIMD holds at most 8 wavefronts and 512 VGPRs per lane (granule 8), the CU 64 KB of LDS.
    """
    if target.backend == "cuda":
        per_warp = -(-registers * 32 // 256) * 256
        by_registers = (65536 // per_warp) // num_warps
        shared_per_sm = {80: 164, 90: 228}[target.arch] * 1024
        by_shared = shared_per_sm // (shared_bytes + 1024)
        programs = min(by_registers, by_shared, 32, 64 // num_warps)
        return programs * num_warps / 64
    waves_per_simd = min(8, 512 // (-(-registers // 8) * 8))
    programs = (4 * waves_per_simd) // num_warps if num_warps <= 4 else waves_per_simd // -(-num_warps // 4)
    if shared_bytes:
        programs = min(programs, 65536 // shared_bytes)
    return min(programs * num_warps, 32) / 32


def check(variant: KernelVariant, target_name: str) -> dict:
    """Compile ``variant``'s launch for a target of :data:`TARGETS`: its resources, or the compile error."""
    launch = variant_launch(variant)
    row = dict(variant=variant.name, target=target_name, num_warps=launch.num_warps)
    try:
        compiled = compile_launch(launch, TARGETS[target_name])
    except Exception as error:  # reported per variant, so that one failure does not hide the others
        return dict(row, error=f"{type(error).__name__}: {error}")
    return dict(row, error=None, **dataclasses.asdict(resources(compiled, TARGETS[target_name], launch.num_warps)))


def check_all(workers: int = 2) -> list[dict]:
    """:func:`check` of every variant on every target, in ``workers`` processes."""
    jobs = [(variant, name) for variant in KernelVariant.all() for name in TARGETS]
    if workers <= 1:
        return [check(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(check, *zip(*jobs)))


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="compiling processes")
    args = parser.parse_args()
    print(json.dumps(check_all(args.workers)))


if __name__ == "__main__":
    main()
