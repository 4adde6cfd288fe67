"""General CPU path of the masked AdamW step: the Triton kernels' algorithm compiled with numba, on the same tables.

It steps every variant (fp32/bf16/fp16 parameters, master copies, stochastic rounding, 8-bit state, dense or compact
gradients); fp32 parameters with fp32 state take the AVX-512 block path (:mod:`.masked_adamw_cpu_blocks`) instead
where the CPU has it (:func:`sparse_rl.kernels.dispatch.launch` picks). Both give the same bits.

Why numba and not plain PyTorch: a gather/compute/scatter step in PyTorch moves every selected value through several
temporaries. Here each parallel work item (``prange`` over runs of tiles, on torch's thread count) walks its tiles'
bitmasks and, for batches of up to ``_BATCH`` selected entries of one tensor, (1) decodes their flat indices,
(2) gathers their grads and values into small buffers (independent loads, so many cache misses are in flight at
once), (3) updates moments and values as contiguous vectors, which LLVM turns into AVX code, (4) scatters the values
back. Each selected entry is read and written once; unselected entries are never written. When the launch table names
a rounded copy (``layout.COL_ROUNDED``, the weight sync's fused scan), (5) writes the batch's new values in bf16 into
its slots (contiguous: the batch's slots are consecutive). numba ships wheels for every
platform PyTorch does, needs no compiler on the user's machine, and caches the compiled code on disk, so only the first
use on a machine pays the compilation.

Every fp32 operation is the one the Triton kernel performs, in the same order, with IEEE rounding and no FMA
contraction (numba does not contract without ``fastmath``, which we do not use: it would also reassociate), so both
backends produce bit-identical results; vector sqrt and division are correctly rounded like the scalar ones.
bf16/fp16 values are handled as bit patterns (numba has no half types); stochastic rounding draws the same Philox
numbers as ``tl.randint``. The fp32 and 8-bit paths share one driver: the 8-bit one dequantises a batch's moments
into buffers before the update and requantises them after. The numba functions named like the Triton helpers of
:mod:`.masked_adamw` and :mod:`.masked_adamw_8bit` (``load_as_fp32``, ``store_from_fp32``, the quantisation) are their
twins by design: the same operations for another compiler.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from . import layout
from .cpu_common import (
    CHUNK_TILES,
    JIT,
    UNBOUNDED,
    adamw_arguments,
    adamw_entry,
    as_pointer,
    bf16_bits_as_torch_cpu,
    lowest_bit,
    popcount,
)
from .layout import PARAM_KINDS, QUANT_BLOCK, TILE, WORDS_PER_TILE, AdamWScalars, KernelVariant

_PARAM_FP32 = layout.PARAM_FP32
_PARAM_BF16 = layout.PARAM_BF16
_PARAM_FP16 = layout.PARAM_FP16
_COL_PARAM = layout.COL_PARAM
_COL_GRAD = layout.COL_GRAD
_COL_EXP_AVG = layout.COL_EXP_AVG
_COL_EXP_AVG_SQ = layout.COL_EXP_AVG_SQ
_COL_MASTER = layout.COL_MASTER
_COL_MASK_WORDS = layout.COL_MASK_WORDS
_COL_TILE_OFFSETS = layout.COL_TILE_OFFSETS
_COL_TENSOR_ID = layout.COL_TENSOR_ID
_COL_ABSMAX1 = layout.COL_ABSMAX1
_COL_ABSMAX2 = layout.COL_ABSMAX2
_COL_BLOCK_OFFSETS = layout.COL_BLOCK_OFFSETS
_COL_ROUNDED = layout.COL_ROUNDED


# ---------------------------------------------------------------------------------------------------- intrinsics
@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


# ---------------------------------------------------------------------------------------------------- conversions
@njit(inline="always", **JIT)
def _fp16_bits_to_f32(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:  # zero or subnormal: mantissa * 2**-24, exact in fp32
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return _bits_to_f32(_f32_to_bits(magnitude) | sign)
    if exponent == 31:
        return _bits_to_f32(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
    return _bits_to_f32(sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13)))


@njit(inline="always", **JIT)
def _f32_to_fp16_bits(value):
    """Round to nearest even, as numpy's ``astype(float16)`` and CUDA's ``cvt.rn.f16.f32``."""
    bits = _f32_to_bits(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude_bits = bits & np.uint32(0x7FFFFFFF)
    if magnitude_bits >= np.uint32(0x7F800000):  # inf / nan
        if magnitude_bits == np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7C00))
        return np.uint16(sign | np.uint32(0x7E00))
    if magnitude_bits >= np.uint32(0x47800000):  # >= 2**16: overflow
        return np.uint16(sign | np.uint32(0x7C00))
    if magnitude_bits < np.uint32(0x38800000):  # below 2**-14: subnormal half, a multiple of 2**-24
        scaled = _bits_to_f32(magnitude_bits) * np.float32(16777216.0)
        return np.uint16(sign | np.uint32(np.rint(scaled)))
    mantissa = magnitude_bits & np.uint32(0x7FFFFF)
    half = ((magnitude_bits - np.uint32(0x38000000)) >> np.uint32(13)) & np.uint32(0x7C00)
    if (mantissa & np.uint32(0x3FFF)) != np.uint32(0x1000):
        mantissa = mantissa + np.uint32(0x1000)
    result = half + (mantissa >> np.uint32(13))  # a carry into the exponent is the right result (up to inf)
    return np.uint16(sign | result)


@njit(inline="always", **JIT)
def _philox_randint(seed, counter0, counter1):
    """First output word of ``tl.randint(seed, counter1 << 32 | counter0)`` (Philox 4x32, 10 rounds)."""
    mask = np.uint64(0xFFFFFFFF)
    c0 = np.uint64(counter0) & mask
    c1 = np.uint64(counter1) & mask
    c2 = np.uint64(0)
    c3 = np.uint64(0)
    k0 = np.uint64(seed) & mask
    k1 = (np.uint64(seed) >> np.uint64(32)) & mask
    round_a = np.uint64(0xD2511F53)
    round_b = np.uint64(0xCD9E8D57)
    for _ in range(10):
        prev0 = c0
        prev2 = c2
        c0 = ((round_b * prev2) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((round_a * prev0) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (round_b * prev2) & mask
        c3 = (round_a * prev0) & mask
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return np.uint32(c0)


@njit(inline="always", **JIT)
def load_as_fp32(param_fp32, param_bits, index, param_kind):
    if param_kind == _PARAM_FP32:
        return param_fp32[index]
    if param_kind == _PARAM_BF16:
        return _bits_to_f32(np.uint32(param_bits[index]) << np.uint32(16))
    return _fp16_bits_to_f32(param_bits[index])


@njit(inline="always", **JIT)
def store_from_fp32(param_fp32, param_bits, index, value, param_kind, stochastic, seed, stream):
    if param_kind == _PARAM_FP32:
        param_fp32[index] = value
        return
    bits = _f32_to_bits(value)
    if value != value:  # nan stays nan
        param_bits[index] = np.uint16(0x7FC0) if param_kind == _PARAM_BF16 else np.uint16(0x7E00)
        return
    if stochastic:
        noise = _philox_randint(seed, index, stream)
    if param_kind == _PARAM_BF16:
        if stochastic:
            bits = bits + (noise & np.uint32(0xFFFF))
        else:
            bits = bits + (((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))
        param_bits[index] = np.uint16(bits >> np.uint32(16))
    else:
        if stochastic:
            value = _bits_to_f32((bits + (noise & np.uint32(0x1FFF))) & np.uint32(0xFFFFE000))
        param_bits[index] = _f32_to_fp16_bits(value)


# ---------------------------------------------------------------------------------------------------- 8-bit codes
def search_starts(qmap: np.ndarray) -> np.ndarray:
    """For each value of the top 16 bits of an fp32 number, the largest code below every float sharing them.

    The nearest code of ``x`` is then found by walking up from ``starts[bits(x) >> 16]`` (one or two steps), instead
    of the Triton kernel's 8-step binary search of dependent loads (:func:`.masked_adamw_8bit.quantise`). The result is
    the same code: the map is strictly increasing, so "nearest, ties to the lower code" has one answer.
    """
    qmap = np.asarray(qmap, dtype=np.float32)
    if not (np.diff(qmap) > 0).all():
        raise ValueError("the quantisation map must be strictly increasing")
    keys = np.arange(2**16, dtype=np.uint32) << np.uint32(16)
    ends = np.stack([keys.view(np.float32), (keys | np.uint32(0xFFFF)).view(np.float32)])
    with np.errstate(invalid="ignore"):
        lower = np.nan_to_num(ends.min(axis=0), nan=-np.inf)
        upper = np.nan_to_num(ends.max(axis=0), nan=np.inf)
    starts = np.clip(np.searchsorted(qmap, lower, side="left") - 1, 0, qmap.size - 1)
    # The nearest code of any x in a key's range is at most one past the largest code <= the range's top: that many
    # steps from the start. _quantise walks a fixed _MAX_WALK steps, without branches; refuse a map needing more.
    # only normalised values in [-1, 1] are quantised (NaN ranges keep their start: no comparison holds for NaN)
    in_range = np.isfinite(ends).all(axis=0) & (upper >= -1.0) & (lower <= 1.0)
    top = np.searchsorted(qmap, np.clip(upper, -1.0, 1.0), side="right") - 1
    walk = np.minimum(top + 1, qmap.size - 1) - starts
    if walk[in_range].max() > _MAX_WALK:
        raise ValueError(f"the quantisation map needs a {walk[in_range].max()}-step walk from its search starts; the "
                         f"CPU path supports maps that need at most {_MAX_WALK} (bitsandbytes' dynamic maps need 2)")
    return starts.astype(np.uint8)


_MAX_WALK = 2


@njit(inline="always", **JIT)
def _quantise(normalised, qmap, starts):
    """Nearest entry of the sorted 256-entry map, ties to the lower one (see :func:`search_starts`).

    A fixed number of branch-free steps instead of a loop that stops: the stopping branch was mispredicted about once
    per value. Once a step does not get closer, no later one does (the map is increasing), so extra steps change
    nothing."""
    code = np.int64(starts[_f32_to_bits(normalised) >> np.uint32(16)])
    code = _walk_step(normalised, qmap, code)  # the _MAX_WALK steps, written out
    code = _walk_step(normalised, qmap, code)
    return np.uint8(code)


@njit(inline="always", **JIT)
def _walk_step(normalised, qmap, code):
    """One step up if it gets closer, as an addition of the comparison: a select here is turned back into a branch
    by LLVM's x86 cmov conversion (its operand feeds the next load), and that branch is mispredicted half the time."""
    step = code + np.int64(code < 255)
    return code + np.int64(abs(normalised - qmap[step]) < abs(normalised - qmap[code]))


@njit(inline="always", **JIT)
def _requantise_block(values, first, last, absmax, block, codes, qmap, starts):
    block_max = np.float32(0.0)
    for j in range(first, last):
        block_max = max(block_max, abs(values[j]))
    absmax[block] = block_max
    for j in range(first, last):
        normalised = values[j] / block_max if block_max > np.float32(0.0) else np.float32(0.0)
        codes[j] = _quantise(min(max(normalised, np.float32(-1.0)), np.float32(1.0)), qmap, starts)



# ---------------------------------------------------------------------------------------------------- the step
_BATCH = 2048  # selected entries of one tensor gathered, updated and scattered together


# A tile with at least this many selected entries is decoded word by word without data-dependent branches.
_DENSE_TILE = 64


@njit(inline="always", **JIT)
def _decode_tile(words, first, selected, indices, count):
    """Append the flat indices of the ``selected`` entries of a tile (its mask ``words``, first entry ``first``) to
    ``indices[count:]``; return the new count. ``indices`` needs 8 entries of slack past the tile's last.

    The loops over set bits are shaped so that few branches depend on the data (a mispredicted branch costs about as
    much as decoding ten entries): in a dense tile every word writes 8 candidates (the positions of its lowest 8 bits,
    the ones past its popcount are overwritten next) and loops only for more; in a sparse tile a summary of the
    non-zero words is built first, so the loop visits only words holding a selected entry.
    """
    if selected >= _DENSE_TILE:
        for w in range(WORDS_PER_TILE):
            word = words[w]
            base = first + w * 32
            rest = word
            for k in range(8):
                indices[count + k] = base + lowest_bit(rest | np.uint32(0x80000000))
                rest &= rest - np.uint32(1)
            k = 8
            while rest != 0:
                indices[count + k] = base + lowest_bit(rest)
                rest &= rest - np.uint32(1)
                k += 1
            count += popcount(word)
        return count
    summary = np.uint32(0)
    for w in range(WORDS_PER_TILE):
        summary |= np.uint32(words[w] != 0) << np.uint32(w)
    while summary != 0:
        w = lowest_bit(summary)
        summary &= summary - np.uint32(1)
        word = words[w]
        base = first + w * 32
        while True:
            indices[count] = base + lowest_bit(word)
            count += 1
            word &= word - np.uint32(1)
            if word == 0:
                break
    return count


@njit(inline="always", **JIT)
def _gather(address, indices, count, out, param_kind):
    """``out[j] = tensor[indices[j]]`` widened to fp32, for the fp32/bf16/fp16 tensor at ``address``."""
    as_fp32 = carray(as_pointer(address), UNBOUNDED, np.float32)
    as_bits = carray(as_pointer(address), UNBOUNDED, np.uint16)
    if param_kind == _PARAM_FP32:
        for j in range(count):
            out[j] = as_fp32[indices[j]]
    else:
        for j in range(count):
            out[j] = load_as_fp32(as_fp32, as_bits, indices[j], param_kind)


@njit(inline="always", **JIT)
def _gather_pair(first_address, second_address, indices, count, first_out, second_out, param_kind):
    """:func:`_gather` from two tensors in one loop: both streams of cache misses are in flight together."""
    first_fp32 = carray(as_pointer(first_address), UNBOUNDED, np.float32)
    first_bits = carray(as_pointer(first_address), UNBOUNDED, np.uint16)
    second_fp32 = carray(as_pointer(second_address), UNBOUNDED, np.float32)
    second_bits = carray(as_pointer(second_address), UNBOUNDED, np.uint16)
    if param_kind == _PARAM_FP32:
        for j in range(count):
            index = indices[j]
            first_out[j] = first_fp32[index]
            second_out[j] = second_fp32[index]
    else:
        for j in range(count):
            index = indices[j]
            first_out[j] = load_as_fp32(first_fp32, first_bits, index, param_kind)
            second_out[j] = load_as_fp32(second_fp32, second_bits, index, param_kind)


@njit(inline="always", **JIT)
def _load_compact(address, first_slot, count, out, param_kind):
    """``out[j] = compact[first_slot + j]`` widened to fp32, for the compact gradient at ``address``."""
    as_fp32 = carray(as_pointer(address), UNBOUNDED, np.float32)
    as_bits = carray(as_pointer(address), UNBOUNDED, np.uint16)
    for j in range(count):
        out[j] = load_as_fp32(as_fp32, as_bits, first_slot + j, param_kind)


@njit(inline="always", **JIT)
def _scatter(address, indices, count, values, param_kind, stochastic, seed, stream):
    """``tensor[indices[j]] = values[j]``, rounded to the bf16/fp16 tensor's dtype as the Triton kernel does."""
    as_fp32 = carray(as_pointer(address), UNBOUNDED, np.float32)
    as_bits = carray(as_pointer(address), UNBOUNDED, np.uint16)
    if param_kind == _PARAM_FP32:
        for j in range(count):
            as_fp32[indices[j]] = values[j]
    else:
        for j in range(count):
            store_from_fp32(as_fp32, as_bits, indices[j], values[j], param_kind, stochastic, seed, stream)


@njit(inline="always", **JIT)
def _record_rounded(address, param_address, indices, count, values, param_kind):
    """``rounded[j]`` = bf16 bits of the new value of the batch's ``j``-th entry (``rounded`` at ``address``: the
    batch's slots of the table's rounded copy): fp32 values rounded as torch does on CPU; a bf16 parameter's bits as
    just stored (nearest or stochastic rounding alike). fp16 parameters are never tracked (``MaskedAdamW`` refuses)."""
    rounded = carray(as_pointer(address), count, np.uint16)
    if param_kind == _PARAM_FP32:
        for j in range(count):
            rounded[j] = bf16_bits_as_torch_cpu(_f32_to_bits(values[j]))
    else:
        param_bits = carray(as_pointer(param_address), UNBOUNDED, np.uint16)
        for j in range(count):
            rounded[j] = param_bits[indices[j]]


@njit(inline="always", **JIT)
def _adamw(grad, value, m, v, count, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, step_size,
           bias_correction2_sqrt, eps):
    """The update on contiguous fp32 vectors (vectorised by LLVM)."""
    for j in range(count):
        m[j], v[j], update = adamw_entry(grad[j], m[j], v[j], beta1, beta2, one_minus_beta1, one_minus_beta2,
                                         step_size, bias_correction2_sqrt, eps)
        value[j] = value[j] * decay - update


@njit(inline="always", **JIT)
def _dequantise(codes, absmax, qmap, block_offsets, batch_tiles, tile_starts, num_tiles, out):
    """Moments of the batch from their 8-bit codes: ``qmap[code] * absmax[block]``, blocks counted inside each tile."""
    for t in range(num_tiles):
        first_block = np.int64(block_offsets[batch_tiles[t]])
        for j in range(tile_starts[t], tile_starts[t + 1]):
            out[j] = qmap[codes[j]] * absmax[first_block + (j - tile_starts[t]) // QUANT_BLOCK]


@njit(inline="always", **JIT)
def _requantise(values, codes, absmax, qmap, starts, block_offsets, batch_tiles, tile_starts, num_tiles):
    for t in range(num_tiles):
        first_block = np.int64(block_offsets[batch_tiles[t]])
        for first in range(tile_starts[t], tile_starts[t + 1], QUANT_BLOCK):
            last = min(first + QUANT_BLOCK, tile_starts[t + 1])
            _requantise_block(values, first, last, absmax, first_block + (first - tile_starts[t]) // QUANT_BLOCK,
                              codes, qmap, starts)


@njit(**JIT)
def _step_batch(table, row, first_slot, indices, count, batch_tiles, tile_starts, num_tiles, grads, values, m_buffer,
                v_buffer, qmaps, starts, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, step_size,
                bias_correction2_sqrt, eps, seed, param_kind, has_master, stochastic, quantised, compact_grad):
    """Step ``count`` selected entries of one tensor, whose compact slots start at ``first_slot``: gather grads (and
    param values), update moments and values as contiguous vectors, scatter the values back."""
    param_address = table[row, _COL_PARAM]
    if compact_grad:  # the gradient holds the selected entries only, in slot order: a contiguous read
        _load_compact(table[row, _COL_GRAD], first_slot, count, grads, param_kind)
    if has_master:
        if not compact_grad:
            _gather(table[row, _COL_GRAD], indices, count, grads, param_kind)
        value = carray(as_pointer(table[row, _COL_MASTER] + first_slot * 4), count, np.float32)
    else:
        value = values
        if compact_grad:
            _gather(param_address, indices, count, value, param_kind)
        else:
            _gather_pair(table[row, _COL_GRAD], param_address, indices, count, grads, value, param_kind)
    if quantised:
        codes1 = carray(as_pointer(table[row, _COL_EXP_AVG] + first_slot), count, np.uint8)
        codes2 = carray(as_pointer(table[row, _COL_EXP_AVG_SQ] + first_slot), count, np.uint8)
        absmax1 = carray(as_pointer(table[row, _COL_ABSMAX1]), UNBOUNDED, np.float32)
        absmax2 = carray(as_pointer(table[row, _COL_ABSMAX2]), UNBOUNDED, np.float32)
        block_offsets = carray(as_pointer(table[row, _COL_BLOCK_OFFSETS]), UNBOUNDED, np.int32)
        _dequantise(codes1, absmax1, qmaps[0], block_offsets, batch_tiles, tile_starts, num_tiles, m_buffer)
        _dequantise(codes2, absmax2, qmaps[1], block_offsets, batch_tiles, tile_starts, num_tiles, v_buffer)
        m, v = m_buffer, v_buffer
    else:
        m = carray(as_pointer(table[row, _COL_EXP_AVG] + first_slot * 4), count, np.float32)
        v = carray(as_pointer(table[row, _COL_EXP_AVG_SQ] + first_slot * 4), count, np.float32)
    _adamw(grads, value, m, v, count, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, step_size,
           bias_correction2_sqrt, eps)
    if quantised:
        _requantise(m, codes1, absmax1, qmaps[0], starts[0], block_offsets, batch_tiles, tile_starts, num_tiles)
        _requantise(v, codes2, absmax2, qmaps[1], starts[1], block_offsets, batch_tiles, tile_starts, num_tiles)
    _scatter(param_address, indices, count, value, param_kind, stochastic, seed, table[row, _COL_TENSOR_ID])
    if table[row, _COL_ROUNDED] != 0:
        _record_rounded(table[row, _COL_ROUNDED] + first_slot * 2, param_address, indices, count, value, param_kind)


@njit(**JIT)
def _run_tiles(table, tiles, first_work, last_work, *args):
    """Step the work tiles ``first_work:last_work``, batching consecutive tiles of a tensor (consecutive slots)."""
    capacity = _BATCH + TILE
    indices = np.empty(capacity + 8, np.int64)
    grads = np.empty(capacity, np.float32)
    values = np.empty(capacity, np.float32)
    m_buffer = np.empty(capacity, np.float32)
    v_buffer = np.empty(capacity, np.float32)
    batch_tiles = np.empty(capacity, np.int64)
    tile_starts = np.empty(capacity + 1, np.int64)
    row = np.int64(-1)
    first_slot = np.int64(0)
    count = 0
    num_tiles = 0
    for work in range(first_work, last_work):
        work_row = np.int64(tiles[work, 0])
        tile = np.int64(tiles[work, 1])
        tile_offsets = carray(as_pointer(table[work_row, _COL_TILE_OFFSETS]), tile + 2, np.int32)
        slot = np.int64(tile_offsets[tile])
        if work_row != row or slot != first_slot + count or count >= _BATCH:
            if count > 0:
                tile_starts[num_tiles] = count
                _step_batch(table, row, first_slot, indices, count, batch_tiles, tile_starts, num_tiles, grads,
                            values, m_buffer, v_buffer, *args)
            row, first_slot, count, num_tiles = work_row, slot, 0, 0
        words = carray(as_pointer(table[row, _COL_MASK_WORDS] + tile * (WORDS_PER_TILE * 4)), WORDS_PER_TILE,
                       np.uint32)
        batch_tiles[num_tiles] = tile
        tile_starts[num_tiles] = count
        num_tiles += 1
        count = _decode_tile(words, tile * TILE, np.int64(tile_offsets[tile + 1]) - slot, indices, count)
    if count > 0:
        tile_starts[num_tiles] = count
        _step_batch(table, row, first_slot, indices, count, batch_tiles, tile_starts, num_tiles, grads, values,
                    m_buffer, v_buffer, *args)


# The launcher pair below and the block path's are twins by design: each calls its own module's _run_tiles. A shared
# pair would take _run_tiles as an argument (or closure variable), and numba's disk cache (cache=True) misses for such
# a function in every new process (checked with numba 0.68: the argument's type differs per process), so it would be
# recompiled at each start.
@njit(parallel=True, **JIT)
def _step_parallel(table, tiles, *args):
    # _run_tiles must stay a function of its own: inlined into the prange body, its stores through raw-address views
    # are dropped by numba's parfor pass (seen with numba 0.68; the parallel tests compare against the reference).
    num_work = tiles.shape[0]
    for chunk in prange((num_work + CHUNK_TILES - 1) // CHUNK_TILES):
        first = chunk * CHUNK_TILES
        _run_tiles(table, tiles, first, min(first + CHUNK_TILES, num_work), *args)


@njit(**JIT)
def _step_serial(table, tiles, *args):
    _run_tiles(table, tiles, 0, tiles.shape[0], *args)


def step_general(table: np.ndarray, tiles: np.ndarray, scalars: AdamWScalars, variant: KernelVariant,
                 qmaps: tuple[torch.Tensor, torch.Tensor] | None, *, parallel: bool) -> None:
    """Step the work ``tiles`` of the tensors in ``table`` (checked by :func:`sparse_rl.kernels.dispatch.launch`);
    ``qmaps``: the 8-bit state's quantisation maps, or None for fp32 state."""
    maps, starts = _NO_MAPS if qmaps is None else _prepared_maps(*(q.cpu().numpy().tobytes() for q in qmaps))
    (_step_parallel if parallel else _step_serial)(
        table, tiles, maps, starts, *adamw_arguments(scalars), np.int64(scalars.seed),
        np.int64(PARAM_KINDS[variant.param_dtype]), variant.has_master, variant.stochastic_rounding,
        variant.state_bits == 8, variant.compact_grad,
    )


_NO_MAPS = (np.zeros((2, 256), np.float32), np.zeros((2, 2**16), np.uint8))


@functools.cache
def _prepared_maps(qmap1: bytes, qmap2: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The two maps (raw fp32 bytes) as one [2, 256] array and their search starts as [2, 65536], once per pair."""
    maps = np.stack([np.frombuffer(qmap1, np.float32), np.frombuffer(qmap2, np.float32)])
    return maps, np.stack([search_starts(maps[0]), search_starts(maps[1])])
