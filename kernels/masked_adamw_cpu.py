"""CPU path of the masked AdamW step: the Triton kernels' algorithm compiled with numba, on the same tables.

Why numba: a gather/compute/scatter step in plain PyTorch moves every selected value through several temporaries
and was measured 4x slower than the dense fused AdamW step; a compiled loop that walks the bitmask (skipping empty
32-bit words, ``ctz`` over set bits) touches each selected entry once and runs on all cores (``prange`` over tiles).
numba ships wheels for every platform PyTorch does, needs no compiler on the user's machine, and caches the
compiled code on disk (``cache=True``), so only the first use on a machine pays the ~10 s compilation.

Every fp32 operation is the one the Triton kernel performs, in the same order, with IEEE rounding and no FMA
contraction (numba does not contract without ``fastmath``), so both backends produce bit-identical results.
bf16/fp16 values are handled as bit patterns (numba has no half types); stochastic rounding draws the same Philox
numbers as ``tl.randint``.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from . import layout
from .layout import BLOCKS_PER_TILE, PARAM_KINDS, QUANT_BLOCK, TABLE_COLUMNS, TILE, WORDS_PER_TILE, AdamWScalars

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
_ALL_BITS = np.uint32(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------------- intrinsics
@intrinsic
def _as_pointer(typingctx, address):
    """int64 address -> void*, so that ``carray`` can view memory named in the tensor table."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


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
@njit(inline="always", cache=True)
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


@njit(inline="always", cache=True)
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


@njit(inline="always", cache=True)
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


@njit(inline="always", cache=True)
def load_as_fp32(param_fp32, param_bits, index, param_kind):
    if param_kind == _PARAM_FP32:
        return param_fp32[index]
    if param_kind == _PARAM_BF16:
        return _bits_to_f32(np.uint32(param_bits[index]) << np.uint32(16))
    return _fp16_bits_to_f32(param_bits[index])


@njit(inline="always", cache=True)
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


# ---------------------------------------------------------------------------------------------------- the step
_CHUNK_TILES = 32  # tiles per parallel work item
# Below this many tiles (256K entries) a parallel region costs more than it saves: run on the calling thread.
_SERIAL_TILES = 256


@intrinsic
def _prefetch(typingctx, address, for_write):
    """``llvm.prefetch`` of an int64 address (``for_write`` a literal 0 or 1), keeping the line in all cache levels."""

    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        builder.call(function, [builder.inttoptr(args[0], byte_pointer), ir.Constant(i32, for_write.literal_value),
                                ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    if not isinstance(for_write, types.IntegerLiteral):
        return None
    return types.void(address, for_write), codegen


@njit(inline="always", cache=True)
def _decode_tile(table, row, tile, element_bytes, indices):
    """Write the flat indices of ``tile``'s selected entries into ``indices``; return how many.

    It also prefetches the cache lines of grad (read) and param (write) holding them: at low density the step is bound
    by the latency of these scattered lines, and decoding one tile ahead of the compute keeps many of them in flight.
    """
    words = carray(_as_pointer(table[row, _COL_MASK_WORDS] + tile * (WORDS_PER_TILE * 4)), WORDS_PER_TILE,
                   np.uint32)
    grad_base = table[row, _COL_GRAD]
    param_base = table[row, _COL_PARAM]
    count = 0
    last_line = np.int64(-1)
    for w in range(WORDS_PER_TILE):
        word = words[w]
        if word == 0:
            continue
        first = tile * TILE + w * 32
        if word == _ALL_BITS:
            for bit in range(32):
                indices[count] = first + bit
                count += 1
            for byte in range(0, 32 * element_bytes, 64):
                _prefetch(grad_base + first * element_bytes + byte, 0)
                _prefetch(param_base + first * element_bytes + byte, 1)
            last_line = (first * element_bytes + 32 * element_bytes - 1) >> 6
            continue
        while word != 0:
            index = first + np.int64(trailing_zeros(word))
            word = np.uint32(word & np.uint32(word - np.uint32(1)))
            indices[count] = index
            count += 1
            line = (index * element_bytes) >> 6
            if line != last_line:
                last_line = line
                _prefetch(grad_base + index * element_bytes, 0)
                _prefetch(param_base + index * element_bytes, 1)
    return count


@njit(inline="always", cache=True)
def _step_entries(table, row, tile, indices, count, beta1, beta2, one_minus_beta1, one_minus_beta2, decay,
                  step_size, bias_correction2_sqrt, eps, seed, param_kind, has_master, stochastic):
    unbounded = 1 << 31  # views are bounds-free; only selected entries (inside the tensor) are touched
    param_fp32 = carray(_as_pointer(table[row, _COL_PARAM]), unbounded, np.float32)
    param_bits = carray(_as_pointer(table[row, _COL_PARAM]), unbounded, np.uint16)
    grad_fp32 = carray(_as_pointer(table[row, _COL_GRAD]), unbounded, np.float32)
    grad_bits = carray(_as_pointer(table[row, _COL_GRAD]), unbounded, np.uint16)
    first_slot = np.int64(carray(_as_pointer(table[row, _COL_TILE_OFFSETS]), tile + 1, np.int32)[tile])
    exp_avg = carray(_as_pointer(table[row, _COL_EXP_AVG] + first_slot * 4), TILE, np.float32)
    exp_avg_sq = carray(_as_pointer(table[row, _COL_EXP_AVG_SQ] + first_slot * 4), TILE, np.float32)
    master = carray(_as_pointer(table[row, _COL_MASTER] + first_slot * 4), TILE, np.float32)
    stream = table[row, _COL_TENSOR_ID]
    for j in range(count):
        index = indices[j]
        grad = load_as_fp32(grad_fp32, grad_bits, index, param_kind)
        if has_master:
            value = master[j]
        else:
            value = load_as_fp32(param_fp32, param_bits, index, param_kind)
        m = exp_avg[j] * beta1 + grad * one_minus_beta1
        v = exp_avg_sq[j] * beta2 + (grad * grad) * one_minus_beta2
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        value = value * decay - step_size * (m / denom)
        exp_avg[j] = m
        exp_avg_sq[j] = v
        if has_master:
            master[j] = value
        store_from_fp32(param_fp32, param_bits, index, value, param_kind, stochastic, seed, stream)


@njit(cache=True)
def _run_chunk(chunk, table, tiles, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, step_size,
               bias_correction2_sqrt, eps, seed, param_kind, has_master, stochastic):
    num_tiles = tiles.shape[0]
    element_bytes = 4 if param_kind == _PARAM_FP32 else 2
    first = chunk * _CHUNK_TILES
    last = min(first + _CHUNK_TILES, num_tiles)
    indices = np.empty((2, TILE), np.int64)  # double buffer: decode tile t+1 while computing tile t
    next_count = _decode_tile(table, tiles[first, 0], np.int64(tiles[first, 1]), element_bytes, indices[0])
    for work in range(first, last):
        current = (work - first) & 1
        count = next_count
        if work + 1 < last:
            next_count = _decode_tile(table, tiles[work + 1, 0], np.int64(tiles[work + 1, 1]), element_bytes,
                                      indices[1 - current])
        _step_entries(table, tiles[work, 0], np.int64(tiles[work, 1]), indices[current], count, beta1, beta2,
                      one_minus_beta1, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps, seed,
                      param_kind, has_master, stochastic)


@njit(parallel=True, cache=True)
def _masked_adamw_cpu_parallel(table, tiles, *args):
    for chunk in prange((tiles.shape[0] + _CHUNK_TILES - 1) // _CHUNK_TILES):
        _run_chunk(chunk, table, tiles, *args)


@njit(cache=True)
def _masked_adamw_cpu_serial(table, tiles, *args):
    for chunk in range((tiles.shape[0] + _CHUNK_TILES - 1) // _CHUNK_TILES):
        _run_chunk(chunk, table, tiles, *args)


def search_starts(qmap: np.ndarray) -> np.ndarray:
    """For each value of the top 16 bits of an fp32 number, the largest code below every float sharing them.

    The nearest code of ``x`` is then found by walking up from ``starts[bits(x) >> 16]`` (one or two steps), instead
    of an 8-step binary search of dependent loads: 10x faster on a CPU, and the same code, because the map is strictly
    increasing, so "nearest, ties to the lower code" has one answer, which is also what the Triton search returns.
    """
    qmap = np.asarray(qmap, dtype=np.float32)
    if not (np.diff(qmap) > 0).all():
        raise ValueError("the quantisation map must be strictly increasing")
    keys = np.arange(2**16, dtype=np.uint32) << np.uint32(16)
    ends = np.stack([keys.view(np.float32), (keys | np.uint32(0xFFFF)).view(np.float32)])
    with np.errstate(invalid="ignore"):
        lower = np.nan_to_num(ends.min(axis=0), nan=-np.inf)
    return np.clip(np.searchsorted(qmap, lower, side="left") - 1, 0, qmap.size - 1).astype(np.uint8)


@njit(inline="always", cache=True)
def _quantise(normalised, qmap, starts):
    """Nearest entry of the sorted 256-entry map, ties to the lower one (see :func:`search_starts`)."""
    code = np.int64(starts[_f32_to_bits(normalised) >> np.uint32(16)])
    while code < 255 and abs(normalised - qmap[code + 1]) < abs(normalised - qmap[code]):
        code += 1
    return np.uint8(code)


@njit(inline="always", cache=True)
def _requantise_block(values, first, last, absmax, block, codes, qmap, starts):
    block_max = np.float32(0.0)
    for j in range(first, last):
        block_max = max(block_max, abs(values[j]))
    absmax[block] = block_max
    for j in range(first, last):
        normalised = values[j] / block_max if block_max > np.float32(0.0) else np.float32(0.0)
        codes[j] = _quantise(min(max(normalised, np.float32(-1.0)), np.float32(1.0)), qmap, starts)


@njit(inline="always", cache=True)
def _step_entries_8bit(table, row, tile, indices, count, new_exp_avg, new_exp_avg_sq, qmap1, qmap2, starts1, starts2,
                       beta1, beta2,
                       one_minus_beta1, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps, seed,
                       param_kind, has_master, stochastic):
    unbounded = 1 << 31
    param_fp32 = carray(_as_pointer(table[row, _COL_PARAM]), unbounded, np.float32)
    param_bits = carray(_as_pointer(table[row, _COL_PARAM]), unbounded, np.uint16)
    grad_fp32 = carray(_as_pointer(table[row, _COL_GRAD]), unbounded, np.float32)
    grad_bits = carray(_as_pointer(table[row, _COL_GRAD]), unbounded, np.uint16)
    first_slot = np.int64(carray(_as_pointer(table[row, _COL_TILE_OFFSETS]), tile + 1, np.int32)[tile])
    first_block = np.int64(carray(_as_pointer(table[row, _COL_BLOCK_OFFSETS]), tile + 1, np.int32)[tile])
    codes1 = carray(_as_pointer(table[row, _COL_EXP_AVG] + first_slot), TILE, np.uint8)
    codes2 = carray(_as_pointer(table[row, _COL_EXP_AVG_SQ] + first_slot), TILE, np.uint8)
    absmax1 = carray(_as_pointer(table[row, _COL_ABSMAX1] + first_block * 4), BLOCKS_PER_TILE, np.float32)
    absmax2 = carray(_as_pointer(table[row, _COL_ABSMAX2] + first_block * 4), BLOCKS_PER_TILE, np.float32)
    master = carray(_as_pointer(table[row, _COL_MASTER] + first_slot * 4), TILE, np.float32)
    stream = table[row, _COL_TENSOR_ID]
    for j in range(count):
        block = j // QUANT_BLOCK
        index = indices[j]
        grad = load_as_fp32(grad_fp32, grad_bits, index, param_kind)
        if has_master:
            value = master[j]
        else:
            value = load_as_fp32(param_fp32, param_bits, index, param_kind)
        m = (qmap1[codes1[j]] * absmax1[block]) * beta1 + grad * one_minus_beta1
        v = (qmap2[codes2[j]] * absmax2[block]) * beta2 + (grad * grad) * one_minus_beta2
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        value = value * decay - step_size * (m / denom)
        new_exp_avg[j] = m
        new_exp_avg_sq[j] = v
        if has_master:
            master[j] = value
        store_from_fp32(param_fp32, param_bits, index, value, param_kind, stochastic, seed, stream)
    for block in range((count + QUANT_BLOCK - 1) // QUANT_BLOCK):
        first = block * QUANT_BLOCK
        last = min(first + QUANT_BLOCK, count)
        _requantise_block(new_exp_avg, first, last, absmax1, block, codes1, qmap1, starts1)
        _requantise_block(new_exp_avg_sq, first, last, absmax2, block, codes2, qmap2, starts2)


@njit(cache=True)
def _run_chunk_8bit(chunk, table, tiles, qmap1, qmap2, starts1, starts2, beta1, beta2, one_minus_beta1,
                    one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps, seed, param_kind, has_master,
                    stochastic):
    num_tiles = tiles.shape[0]
    element_bytes = 4 if param_kind == _PARAM_FP32 else 2
    first = chunk * _CHUNK_TILES
    last = min(first + _CHUNK_TILES, num_tiles)
    indices = np.empty((2, TILE), np.int64)
    new_exp_avg = np.empty(TILE, np.float32)
    new_exp_avg_sq = np.empty(TILE, np.float32)
    next_count = _decode_tile(table, tiles[first, 0], np.int64(tiles[first, 1]), element_bytes, indices[0])
    for work in range(first, last):
        current = (work - first) & 1
        count = next_count
        if work + 1 < last:
            next_count = _decode_tile(table, tiles[work + 1, 0], np.int64(tiles[work + 1, 1]), element_bytes,
                                      indices[1 - current])
        _step_entries_8bit(table, tiles[work, 0], np.int64(tiles[work, 1]), indices[current], count, new_exp_avg,
                           new_exp_avg_sq, qmap1, qmap2, starts1, starts2, beta1, beta2, one_minus_beta1,
                           one_minus_beta2, decay,
                           step_size, bias_correction2_sqrt, eps, seed, param_kind, has_master, stochastic)


@njit(parallel=True, cache=True)
def _masked_adamw_8bit_cpu_parallel(table, tiles, *args):
    for chunk in prange((tiles.shape[0] + _CHUNK_TILES - 1) // _CHUNK_TILES):
        _run_chunk_8bit(chunk, table, tiles, *args)


@njit(cache=True)
def _masked_adamw_8bit_cpu_serial(table, tiles, *args):
    for chunk in range((tiles.shape[0] + _CHUNK_TILES - 1) // _CHUNK_TILES):
        _run_chunk_8bit(chunk, table, tiles, *args)


def masked_adamw_cpu(
    tensor_table: torch.Tensor,
    tiles: torch.Tensor,
    scalars: AdamWScalars,
    *,
    param_dtype: torch.dtype,
    has_master: bool,
    stochastic_rounding: bool,
) -> None:
    """Same contract as :func:`masked_adamw_triton`, for CPU tensors."""
    _check_cpu_tables(tensor_table, tiles)
    if tiles.shape[0] == 0:
        return
    f32 = np.float32
    run = _masked_adamw_cpu_parallel if tiles.shape[0] > _SERIAL_TILES else _masked_adamw_cpu_serial
    run(
        tensor_table.numpy(), tiles.numpy(),
        f32(scalars.beta1), f32(scalars.beta2), f32(scalars.one_minus_beta1), f32(scalars.one_minus_beta2),
        f32(scalars.decay), f32(scalars.step_size), f32(scalars.bias_correction2_sqrt), f32(scalars.eps),
        np.int64(scalars.seed), np.int64(PARAM_KINDS[param_dtype]), bool(has_master), bool(stochastic_rounding),
    )


def _check_cpu_tables(tensor_table: torch.Tensor, tiles: torch.Tensor) -> None:
    if tensor_table.device.type != "cpu" or tiles.device.type != "cpu":
        raise ValueError("the numba path steps CPU tensors only; CUDA tensors go to the Triton kernel")
    if tensor_table.dtype != torch.int64 or tensor_table.dim() != 2 or tensor_table.shape[1] != TABLE_COLUMNS:
        raise ValueError(f"tensor_table must be int64 [n, {TABLE_COLUMNS}], got {tensor_table.dtype} "
                         f"{tuple(tensor_table.shape)}")
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2 or not tiles.is_contiguous():
        raise ValueError(f"tiles must be contiguous int32 [n, 2], got {tiles.dtype} {tuple(tiles.shape)}")


def masked_adamw_8bit_cpu(
    tensor_table: torch.Tensor,
    tiles: torch.Tensor,
    scalars: AdamWScalars,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    has_master: bool,
    stochastic_rounding: bool,
) -> None:
    """Same contract as :func:`masked_adamw_8bit_triton`, for CPU tensors."""
    _check_cpu_tables(tensor_table, tiles)
    if tiles.shape[0] == 0:
        return
    f32 = np.float32
    run = _masked_adamw_8bit_cpu_parallel if tiles.shape[0] > _SERIAL_TILES else _masked_adamw_8bit_cpu_serial
    run(
        tensor_table.numpy(), tiles.numpy(), qmap1.numpy(), qmap2.numpy(), _cached_starts(qmap1),
        _cached_starts(qmap2),
        f32(scalars.beta1), f32(scalars.beta2), f32(scalars.one_minus_beta1), f32(scalars.one_minus_beta2),
        f32(scalars.decay), f32(scalars.step_size), f32(scalars.bias_correction2_sqrt), f32(scalars.eps),
        np.int64(scalars.seed), np.int64(PARAM_KINDS[param_dtype]), bool(has_master), bool(stochastic_rounding),
    )


_STARTS: dict[bytes, np.ndarray] = {}


def _cached_starts(qmap: torch.Tensor) -> np.ndarray:
    key = qmap.numpy().tobytes()
    if key not in _STARTS:
        _STARTS[key] = search_starts(qmap.numpy())
    return _STARTS[key]
