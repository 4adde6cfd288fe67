"""What both CPU paths of the masked AdamW step share: numba intrinsics, the per-entry AdamW arithmetic, the scalar
arguments and the thread count of a launch.

The general path (:mod:`.masked_adamw_cpu`) and the AVX-512 block path (:mod:`.masked_adamw_cpu_blocks`) both build
on this module and never on each other; :func:`sparse_rl.kernels.dispatch.launch` picks one of them.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from .layout import AdamWScalars

# ``error_model="numpy"``: IEEE semantics for x / 0 (inf/nan, as the Triton kernel) instead of numba's default Python
# check, whose branch would also keep LLVM from vectorising the update loops. ``cache=True``: compiled once per
# machine, kept on disk.
JIT = dict(cache=True, error_model="numpy")
UNBOUNDED = 1 << 31  # length of raw views: only selected entries (inside their tensor) are ever touched
CHUNK_TILES = 64  # work tiles per parallel work item
# Below this many work tiles (256K entries) a parallel region costs more than it saves: run on the calling thread.
SERIAL_TILES = 256


@intrinsic
def as_pointer(typingctx, address):
    """int64 address -> void*, so that ``carray`` can view memory named in the tensor table."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@intrinsic
def _ctpop(typingctx, word):
    """Number of set bits (``llvm.ctpop``: one instruction where the CPU has it)."""

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(args[0].type, [args[0].type])
        function = cgutils.get_or_insert_function(builder.module, function_type, f"llvm.ctpop.i{args[0].type.width}")
        return builder.call(function, [args[0]])

    if not isinstance(word, types.Integer):
        return None
    return word(word), codegen


@njit(inline="always", **JIT)
def popcount(word):
    """Number of set bits of an unsigned word, as int64."""
    return np.int64(_ctpop(word))


@njit(inline="always", **JIT)
def lowest_bit(word):
    """Index of the lowest set bit of a non-zero unsigned word (``tzcnt``), as int64."""
    return np.int64(trailing_zeros(word))


@njit(inline="always", **JIT)
def adamw_entry(g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps):
    """(new m, new v, ``step_size * m / denom``) of one entry, in the Triton kernel's order of IEEE operations
    (``adamw_update`` in :mod:`.masked_adamw`, its twin by design); the value then becomes ``value * decay - update``.
    Both CPU paths call it, so they cannot drift apart."""
    m_j = m * beta1 + g * one_minus_beta1
    v_j = v * beta2 + (g * g) * one_minus_beta2
    denom = np.sqrt(v_j) / bias_correction2_sqrt + eps
    return m_j, v_j, step_size * (m_j / denom)


@njit(inline="always", **JIT)
def bf16_bits_as_torch_cpu(bits):
    """bf16 bits of the fp32 number with bits ``bits`` (uint32), as ``tensor.to(torch.bfloat16)`` gives them on CPU:
    round to nearest even, and every NaN to ``0xFFFF`` (the vectorised conversion, ATen's ``cvtfp32_bf16``, blends
    NaNs to all ones; c10's scalar ``round_to_nearest_even`` would give ``0x7FC0``). No overflow: the largest non-NaN
    pattern, ``0xFF800000``, plus the rounding increment stays below 2**32."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0xFFFF)
    return np.uint16((bits + (((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16))


def adamw_arguments(scalars: AdamWScalars) -> tuple[np.float32, ...]:
    """The launch's fp32 scalars in the order both CPU paths take them: beta1, beta2, 1 - beta1, 1 - beta2, decay,
    step_size, sqrt(bias correction 2), eps."""
    return tuple(np.float32(x) for x in (
        scalars.beta1, scalars.beta2, scalars.one_minus_beta1, scalars.one_minus_beta2, scalars.decay,
        scalars.step_size, scalars.bias_correction2_sqrt, scalars.eps))


@contextlib.contextmanager
def launch_threads(num_work_tiles: int):
    """Yield whether the launch runs in parallel, on as many threads as torch's intra-op pool
    (``torch.set_num_threads`` / OMP_NUM_THREADS), so that comparisons with torch's optimizers are at equal thread
    counts. numba's OpenMP pool, started at its first parallel launch, sets the process's OpenMP thread count (torch's
    too) to all cores: torch's count is put back afterwards."""
    torch_threads = torch.get_num_threads()
    parallel = torch_threads > 1 and num_work_tiles > SERIAL_TILES
    if parallel:
        numba.set_num_threads(min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield parallel
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
