"""AVX-512 block path of the CPU masked AdamW step, for fp32 parameters with fp32 state (the CPU training case).

Why a second CPU path: the general path (:mod:`.masked_adamw_cpu`) decodes every selected entry's flat index and
gathers and scatters the parameter entry by entry, so at moderate density it does more work per cache line than the
dense fused AdamW step, which streams every line once. Here the step is cut in two, per batch of up to eight tiles:

1. the moments, on contiguous compact vectors only (compact gradients, or the selected gradient entries packed with
   ``vcompressps`` from each 16-entry block of the dense gradient): ``m, v`` updated and the update
   ``u = step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`` written to a small buffer, 16 lanes at a time;
2. the parameters, one pass over the 16-entry blocks (one 64-byte cache line each) that hold a selected entry, found
   by a 64-bit summary of the tile's mask (one ``vptestmw``) and a ``tzcnt`` loop, so no branch depends on single
   mask bits: load the 16 values, ``vexpandps`` the block's updates into the selected lanes, compute
   ``p * decay - u`` on all lanes and store the selected lanes' results with the others' old bits.

When the launch table names a rounded copy (``layout.COL_ROUNDED``, the weight sync's fused scan), step 2 also packs
the selected lanes' new values (``vcompressps``) into a buffer, and each batch ends with one vectorised pass rounding
them to bf16 into the copy's slots.

Every parameter line is read and written once, in the same iteration, and the arithmetic is the Triton kernel's in its
order (``value * decay - step_size * (m / denom)``, IEEE, no FMA contraction), so the results are bit-identical to
the general path and to the Triton kernel; unselected entries are stored back with the bits they were loaded with.
The last, partial block of a tensor whose size is not a multiple of 16 is stepped entry by entry, never read past.
Lines of the work tile two ahead are prefetched: at low density the step waits on memory latency, not bandwidth.

It needs AVX-512 (``vcompressps``/``vexpandps`` are its instructions; LLVM's x86 intrinsics are used directly) and
numba compiling for the host CPU; elsewhere :func:`block_path_available` is false and the general path runs.
``SPARSE_RL_CPU_BLOCKS=0`` turns it off (the tests compare both paths bit for bit).
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
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
from .layout import TILE, WORDS_PER_TILE, AdamWScalars

_COL_PARAM = layout.COL_PARAM
_COL_GRAD = layout.COL_GRAD
_COL_EXP_AVG = layout.COL_EXP_AVG
_COL_EXP_AVG_SQ = layout.COL_EXP_AVG_SQ
_COL_MASK_WORDS = layout.COL_MASK_WORDS
_COL_TILE_OFFSETS = layout.COL_TILE_OFFSETS
_COL_NUMEL = layout.COL_NUMEL
_COL_ROUNDED = layout.COL_ROUNDED

LANES = 16  # fp32 lanes of a 512-bit register: one 64-byte cache line
BLOCKS_PER_TILE = TILE // LANES  # 64: a tile's block summary is one 64-bit word
_BATCH_TILES = 8  # tiles of one tensor whose moments are updated together (buffers stay in L1)
_PREFETCH_AHEAD = 2  # work tiles between the one prefetched and the one stepped
_BUFFER = _BATCH_TILES * TILE + LANES  # a block's 16-lane store or load may reach 15 entries past the batch

_F32 = ir.FloatType()
_V16 = ir.VectorType(_F32, LANES)
_MASK16 = ir.VectorType(ir.IntType(1), LANES)
_HALVES = ir.VectorType(ir.IntType(16), BLOCKS_PER_TILE)


def block_path_available() -> bool:
    """True when numba compiles for this machine's CPU and the CPU has AVX-512F (and the user did not opt out)."""
    return os.environ.get("SPARSE_RL_CPU_BLOCKS", "1") != "0" and _host_supports_blocks()


@functools.cache
def _host_supports_blocks() -> bool:
    if numba.config.CPU_NAME not in (None, "host"):  # e.g. NUMBA_CPU_NAME=generic for portable caches
        return False
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


# ---------------------------------------------------------------------------------------------------- intrinsics
def _pointer(builder, address, element):
    return builder.inttoptr(address, ir.PointerType(element))


def _lanes(builder, bits):
    return builder.bitcast(builder.trunc(bits, ir.IntType(LANES)), _MASK16)


def _x86(builder, name):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _MASK16]), name)


@intrinsic
def _block_summary(typingctx, words_address):
    """Bit ``b`` set iff the tile's 16-entry block ``b`` selects anything (its 32 mask words seen as 64 halves)."""

    def codegen(context, builder, signature, args):
        halves = builder.load(_pointer(builder, args[0], _HALVES), align=4)
        nonzero = builder.icmp_unsigned("!=", halves, ir.Constant(_HALVES, None))
        return builder.bitcast(nonzero, ir.IntType(64))

    return types.uint64(types.int64), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Prefetch the cache line at ``address`` for writing (it is read, then written)."""

    def codegen(context, builder, signature, args):
        byte_pointer = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(function, [builder.inttoptr(args[0], byte_pointer), ir.Constant(i32, 1), ir.Constant(i32, 3),
                                ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(types.int64), codegen


@intrinsic
def _compress_block(typingctx, source, destination, bits):
    """Store the ``bits``-selected lanes of the 16 floats at ``source`` contiguously at ``destination`` (which must
    have room for 16: all lanes are stored, the ones past the selected count are overwritten by the next block)."""

    def codegen(context, builder, signature, args):
        values = builder.load(_pointer(builder, args[0], _V16), align=4)
        packed = builder.call(_x86(builder, "llvm.x86.avx512.mask.compress.v16f32"),
                              [values, ir.Constant(_V16, None), _lanes(builder, args[2])])
        builder.store(packed, _pointer(builder, args[1], _V16), align=4)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.uint64), codegen


def _emit_update(builder, updates_address, params_address, bits, decay):
    """IR of ``p = p * decay - u`` on the selected lanes (updates expanded into them); returns (lanes, new values)."""
    lanes = _lanes(builder, bits)
    target = _pointer(builder, params_address, _V16)
    old = builder.load(target, align=4)
    packed = builder.load(_pointer(builder, updates_address, _V16), align=4)
    update = builder.call(_x86(builder, "llvm.x86.avx512.mask.expand.v16f32"), [packed, ir.Constant(_V16, None), lanes])
    splat = builder.insert_element(ir.Constant(_V16, None), decay, ir.Constant(ir.IntType(32), 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), LANES), None))
    new = builder.fsub(builder.fmul(old, splat), update)
    builder.store(builder.select(lanes, new, old), target, align=4)
    return lanes, new


@intrinsic
def _update_block(typingctx, updates, params, bits, decay):
    """``p = p * decay - u`` on the ``bits``-selected lanes of the 16 floats at ``params``, their updates taken in
    order from ``updates``; the other lanes are stored back as loaded."""

    def codegen(context, builder, signature, args):
        _emit_update(builder, *args)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.uint64, types.float32), codegen


@intrinsic
def _update_block_keep(typingctx, updates, params, bits, decay, kept):
    """:func:`_update_block`, and the selected lanes' new values stored contiguously at ``kept`` (all 16 lanes are
    stored, as in :func:`_compress_block`: the ones past the selected count are overwritten by the next block)."""

    def codegen(context, builder, signature, args):
        lanes, new = _emit_update(builder, *args[:4])
        selected = builder.call(_x86(builder, "llvm.x86.avx512.mask.compress.v16f32"),
                                [new, ir.Constant(_V16, None), lanes])
        builder.store(selected, _pointer(builder, args[4], _V16), align=4)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.uint64, types.float32, types.int64), codegen


# ---------------------------------------------------------------------------------------------------- the step
@njit(inline="always", **JIT)
def _moments(grad, update, m, v, count, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
             bias_correction2_sqrt, eps):
    """Moments and ``step_size * m / denom`` on contiguous fp32 vectors (:func:`.cpu_common.adamw_entry`)."""
    for j in range(count):
        m[j], v[j], update[j] = adamw_entry(grad[j], m[j], v[j], beta1, beta2, one_minus_beta1, one_minus_beta2,
                                            step_size, bias_correction2_sqrt, eps)


@njit(inline="always", **JIT)
def _full_blocks(numel, tile):
    """Summary bits of the tile's blocks that lie wholly inside the tensor."""
    inside = (numel - tile * TILE) // LANES
    if inside >= BLOCKS_PER_TILE:
        return ~np.uint64(0)
    return (np.uint64(1) << np.uint64(inside)) - np.uint64(1)


@njit(inline="always", **JIT)
def _block_bits(words, block):
    return (np.uint64(words[block >> 1]) >> np.uint64(16 * (block & 1))) & np.uint64(0xFFFF)


@njit(inline="always", **JIT)
def _tile_selection(table, row, tile):
    """(the tile's mask words, summary bits of its selected blocks that lie wholly inside the tensor, and of the
    tensor's last, partial block if the tile holds it and it selects anything)."""
    address = table[row, _COL_MASK_WORDS] + tile * (WORDS_PER_TILE * 4)
    summary = _block_summary(address)
    inside = _full_blocks(table[row, _COL_NUMEL], tile)
    return carray(as_pointer(address), WORDS_PER_TILE, np.uint32), summary & inside, summary & ~inside


@njit(inline="always", **JIT)
def _pack_tile(table, row, tile, packed, count):
    """Append the tile's selected dense-gradient entries to ``packed[count:]``; return the new count.

    It and :func:`_update_tile` walk a tile's selected blocks alike, twins by design: one compresses gradient blocks,
    the other expands updates into parameter blocks. A shared walk would take the per-block action as a function
    argument, which numba recompiles in every process (see the launcher pair of :mod:`.masked_adamw_cpu`)."""
    words, full, tail = _tile_selection(table, row, tile)
    first = tile * TILE
    grad_address = table[row, _COL_GRAD]
    packed_address = packed.ctypes.data
    while full != 0:
        block = lowest_bit(full)
        full &= full - np.uint64(1)
        bits = _block_bits(words, block)
        _compress_block(grad_address + (first + block * LANES) * 4, packed_address + count * 4, bits)
        count += popcount(bits)
    if tail != 0:  # the tensor's last, partial block: entry by entry
        grad = carray(as_pointer(grad_address), UNBOUNDED, np.float32)
        block = lowest_bit(tail)
        bits = _block_bits(words, block)
        while bits != 0:
            packed[count] = grad[first + block * LANES + lowest_bit(bits)]
            bits &= bits - np.uint64(1)
            count += 1
    return count


@njit(inline="always", **JIT)
def _prefetch_tile(table, tiles, work, column):
    row = np.int64(tiles[work, 0])
    tile = np.int64(tiles[work, 1])
    summary = _block_summary(table[row, _COL_MASK_WORDS] + tile * (WORDS_PER_TILE * 4))
    base = table[row, column] + tile * (TILE * 4)
    while summary != 0:
        block = lowest_bit(summary)
        summary &= summary - np.uint64(1)
        _prefetch(base + block * (LANES * 4))


@njit(inline="always", **JIT)
def _update_tile(table, row, tile, updates, count, decay, kept, keep):
    """``p = p * decay - u`` on the tile's selected entries, their updates at ``updates[count:]``; return the count.
    With ``keep``, the new values are also written to ``kept[count:]`` (slot order)."""
    words, full, tail = _tile_selection(table, row, tile)
    first = tile * TILE
    param_address = table[row, _COL_PARAM]
    updates_address = updates.ctypes.data
    kept_address = kept.ctypes.data
    while full != 0:
        block = lowest_bit(full)
        full &= full - np.uint64(1)
        bits = _block_bits(words, block)
        if keep:
            _update_block_keep(updates_address + count * 4, param_address + (first + block * LANES) * 4, bits, decay,
                               kept_address + count * 4)
        else:
            _update_block(updates_address + count * 4, param_address + (first + block * LANES) * 4, bits, decay)
        count += popcount(bits)
    if tail != 0:
        param = carray(as_pointer(param_address), UNBOUNDED, np.float32)
        block = lowest_bit(tail)
        bits = _block_bits(words, block)
        while bits != 0:
            index = first + block * LANES + lowest_bit(bits)
            value = param[index] * decay - updates[count]
            param[index] = value
            kept[count] = value
            bits &= bits - np.uint64(1)
            count += 1
    return count


@njit(**JIT)
def _run_tiles(table, tiles, first_work, last_work, beta1, beta2, one_minus_beta1, one_minus_beta2, decay,
               step_size, bias_correction2_sqrt, eps, compact_grad):
    """Step work tiles ``first_work:last_work`` in batches of up to ``_BATCH_TILES`` consecutive tiles of a tensor
    (their compact slots are consecutive: the work table lists a tensor's non-empty tiles in order)."""
    updates = np.empty(_BUFFER, np.float32)
    packed = np.empty(_BUFFER, np.float32)
    kept = np.empty(_BUFFER, np.float32)
    kept_bits = kept.view(np.uint32)
    work = first_work
    while work < last_work:
        row = np.int64(tiles[work, 0])
        end = work + 1
        while end < last_work and end - work < _BATCH_TILES and np.int64(tiles[end, 0]) == row:
            end += 1
        tile_offsets = carray(as_pointer(table[row, _COL_TILE_OFFSETS]), UNBOUNDED, np.int32)
        first_slot = np.int64(tile_offsets[np.int64(tiles[work, 1])])
        count = np.int64(tile_offsets[np.int64(tiles[end - 1, 1]) + 1]) - first_slot
        if compact_grad:
            grad = carray(as_pointer(table[row, _COL_GRAD] + first_slot * 4), count, np.float32)
        else:
            packed_count = 0
            for w in range(work, end):
                if w + _PREFETCH_AHEAD < last_work:
                    _prefetch_tile(table, tiles, w + _PREFETCH_AHEAD, _COL_GRAD)
                packed_count = _pack_tile(table, row, np.int64(tiles[w, 1]), packed, packed_count)
            grad = packed
        m = carray(as_pointer(table[row, _COL_EXP_AVG] + first_slot * 4), count, np.float32)
        v = carray(as_pointer(table[row, _COL_EXP_AVG_SQ] + first_slot * 4), count, np.float32)
        _moments(grad, updates, m, v, count, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                 bias_correction2_sqrt, eps)
        done = 0
        keep = table[row, _COL_ROUNDED] != 0
        for w in range(work, end):
            if w + _PREFETCH_AHEAD < last_work:
                _prefetch_tile(table, tiles, w + _PREFETCH_AHEAD, _COL_PARAM)
            done = _update_tile(table, row, np.int64(tiles[w, 1]), updates, done, decay, kept, keep)
        if keep:  # the weight sync's rounded copy (layout.COL_ROUNDED), in slot order
            rounded = carray(as_pointer(table[row, _COL_ROUNDED] + first_slot * 2), count, np.uint16)
            for j in range(count):
                rounded[j] = bf16_bits_as_torch_cpu(kept_bits[j])
        work = end


# Twin by design of the general path's launcher pair (see the comment there).
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


def step_blocks(table: np.ndarray, tiles: np.ndarray, scalars: AdamWScalars, *, compact_grad: bool,
                parallel: bool) -> None:
    """Step the work ``tiles`` of the fp32 tensors (fp32 state, no master copy) in ``table`` (checked by
    :func:`sparse_rl.kernels.dispatch.launch`)."""
    (_step_parallel if parallel else _step_serial)(table, tiles, *adamw_arguments(scalars), bool(compact_grad))
