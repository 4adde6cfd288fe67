"""Masked AdamW with 8-bit blockwise-quantised compact moments (bitsandbytes' scheme on the selected entries).

Moments are stored as uint8 codes into bitsandbytes' dynamic quantisation maps (signed for ``exp_avg``, unsigned
for ``exp_avg_sq``) times an fp32 ``absmax`` per block. A block is up to ``QUANT_BLOCK`` (256) selected entries of
one tile, in rank order (see ``layout.py``), so a program owns its blocks and no reduction crosses programs; at
density 100% the blocks are bitsandbytes' own. As in bitsandbytes, a step dequantises, updates the moments and the
parameter in fp32, then re-quantises each block against its new absmax (nearest code, ties to the lower code).
State: 2 bytes per selected entry + 8 bytes per block, against 8 bytes per selected entry in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import layout
from .layout import quantisation_maps  # noqa: F401  (the maps this kernel's codes index)
from .masked_adamw import adamw_update, load_grad_and_value, store_value, tensor_addresses, work_tile

COL_ABSMAX1 = tl.constexpr(layout.COL_ABSMAX1)
COL_ABSMAX2 = tl.constexpr(layout.COL_ABSMAX2)
COL_BLOCK_OFFSETS = tl.constexpr(layout.COL_BLOCK_OFFSETS)


@triton.jit
def quantise(normalised, qmap_ptr):
    """Index of the nearest entry of the sorted 256-entry map (ties to the lower one), by binary search."""
    low = tl.zeros(normalised.shape, dtype=tl.int32)
    high = tl.full(normalised.shape, 255, dtype=tl.int32)
    for _ in tl.static_range(8):
        pivot = (low + high) // 2
        higher = normalised > tl.load(qmap_ptr + pivot)
        low = tl.where(higher, pivot, low)
        high = tl.where(higher, high, pivot)
    low_distance = tl.abs(normalised - tl.load(qmap_ptr + low))
    high_distance = tl.abs(normalised - tl.load(qmap_ptr + high))
    return tl.where(low_distance <= high_distance, low, high)


@triton.jit
def dequantise(codes_ptr, absmax_ptr, qmap_ptr, slot, selected, block, num_blocks, BLOCKS_PER_TILE: tl.constexpr):
    """``qmap[code] * absmax[block]`` of the selected lanes: each of the tile's (at most ``BLOCKS_PER_TILE``) absmax
    values is read once and handed to its lanes, not gathered per lane."""
    codes = tl.load(codes_ptr + slot, mask=selected, other=0).to(tl.int32)
    lane_absmax = tl.zeros(slot.shape, dtype=tl.float32)
    for b in tl.static_range(BLOCKS_PER_TILE):
        block_absmax = tl.load(absmax_ptr + b, mask=b < num_blocks, other=0.0)
        lane_absmax = tl.where(block == b, block_absmax, lane_absmax)
    return tl.load(qmap_ptr + codes) * tl.where(selected, lane_absmax, 0.0)


@triton.jit
def requantise_blocks(values, selected, block, num_blocks, absmax_ptr, codes_ptr, slot, qmap_ptr,
                      BLOCKS_PER_TILE: tl.constexpr):
    """Store the new absmax of each of the tile's blocks and the codes of ``values`` against it (one block at a time:
    a [blocks, TILE] comparison would hold BLOCKS_PER_TILE times the registers)."""
    magnitude = tl.where(selected, tl.abs(values), 0.0)
    lane_max = tl.zeros(values.shape, dtype=tl.float32)
    for b in tl.static_range(BLOCKS_PER_TILE):
        in_block = block == b
        block_max = tl.max(tl.where(in_block, magnitude, 0.0), axis=0)
        tl.store(absmax_ptr + b, block_max, mask=b < num_blocks)
        lane_max = tl.where(in_block & selected, block_max, lane_max)
    normalised = tl.where(lane_max > 0.0, tl.div_rn(values, tl.where(lane_max > 0.0, lane_max, 1.0)), 0.0)
    normalised = tl.minimum(tl.maximum(normalised, -1.0), 1.0)
    tl.store(codes_ptr + slot, quantise(normalised, qmap_ptr).to(tl.uint8), mask=selected)


# The parameters of masked_adamw_kernel (the launch contract of triton_launch), plus the maps and block constants.
@triton.jit(do_not_specialize=["seed"])  # not specialised on the seed's value, which changes every step
def masked_adamw_8bit_kernel(
    table_ptr,
    tiles_ptr,
    qmap1_ptr,
    qmap2_ptr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    decay,
    step_size,
    bias_correction2_sqrt,
    eps,
    seed,
    PARAM_KIND: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPACT_GRAD: tl.constexpr,
    NCOLS: tl.constexpr,
    TILE: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr,
):
    entry, tile, offsets, selected, rank, slot = work_tile(table_ptr, tiles_ptr, NCOLS, TILE)
    param, grad, codes1, codes2, master, stream = tensor_addresses(entry, HAS_MASTER, STOCHASTIC)
    block_offsets_ptr = tl.load(entry + COL_BLOCK_OFFSETS).to(tl.pointer_type(tl.int32))
    first_block = tl.load(block_offsets_ptr + tile).to(tl.int64)
    # this tile's blocks in the absmax vectors, and the codes (the table's moment columns point to uint8 codes)
    absmax1_ptr = tl.load(entry + COL_ABSMAX1).to(tl.pointer_type(tl.float32)) + first_block
    absmax2_ptr = tl.load(entry + COL_ABSMAX2).to(tl.pointer_type(tl.float32)) + first_block
    codes1_ptr = codes1.to(tl.pointer_type(tl.uint8))
    codes2_ptr = codes2.to(tl.pointer_type(tl.uint8))
    block = rank // QUANT_BLOCK
    num_blocks = (tl.sum(selected.to(tl.int32), axis=0) + QUANT_BLOCK - 1) // QUANT_BLOCK

    exp_avg = dequantise(codes1_ptr, absmax1_ptr, qmap1_ptr, slot, selected, block, num_blocks, BLOCKS_PER_TILE)
    exp_avg_sq = dequantise(codes2_ptr, absmax2_ptr, qmap2_ptr, slot, selected, block, num_blocks, BLOCKS_PER_TILE)
    grad, value = load_grad_and_value(param, grad, master, offsets, selected, slot, PARAM_KIND, HAS_MASTER,
                                      COMPACT_GRAD)
    exp_avg, exp_avg_sq, value = adamw_update(grad, value, exp_avg, exp_avg_sq, beta1, beta2, one_minus_beta1,
                                              one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps)
    requantise_blocks(exp_avg, selected, block, num_blocks, absmax1_ptr, codes1_ptr, slot, qmap1_ptr, BLOCKS_PER_TILE)
    requantise_blocks(exp_avg_sq, selected, block, num_blocks, absmax2_ptr, codes2_ptr, slot, qmap2_ptr,
                      BLOCKS_PER_TILE)
    store_value(param, master, stream, offsets, selected, slot, value, seed, PARAM_KIND, HAS_MASTER, STOCHASTIC)
