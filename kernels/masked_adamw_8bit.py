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
from .masked_adamw import adamw_update, load_grad_and_value, store_value, work_tile

COL_ABSMAX1 = tl.constexpr(layout.COL_ABSMAX1)
COL_ABSMAX2 = tl.constexpr(layout.COL_ABSMAX2)
COL_BLOCK_OFFSETS = tl.constexpr(layout.COL_BLOCK_OFFSETS)
COL_EXP_AVG = tl.constexpr(layout.COL_EXP_AVG)
COL_EXP_AVG_SQ = tl.constexpr(layout.COL_EXP_AVG_SQ)


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
def requantise_blocks(values, selected, block, num_blocks, first_block, absmax_ptr, codes_ptr, slot, qmap_ptr,
                      BLOCKS_PER_TILE: tl.constexpr):
    """Store the new absmax of each of the tile's blocks and the codes of ``values`` against it."""
    blocks = tl.arange(0, BLOCKS_PER_TILE)
    in_block = (block[None, :] == blocks[:, None]) & selected[None, :]
    block_max = tl.max(tl.where(in_block, tl.abs(values)[None, :], 0.0), axis=1)
    tl.store(absmax_ptr + first_block + blocks, block_max, mask=blocks < num_blocks)
    lane_max = tl.sum(tl.where(in_block, block_max[:, None], 0.0), axis=0)
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
    block = rank // QUANT_BLOCK
    num_blocks = (tl.sum(selected.to(tl.int32), axis=0) + QUANT_BLOCK - 1) // QUANT_BLOCK
    block_offsets_ptr = tl.load(entry + COL_BLOCK_OFFSETS).to(tl.pointer_type(tl.int32))
    first_block = tl.load(block_offsets_ptr + tile).to(tl.int64)

    codes1_ptr = tl.load(entry + COL_EXP_AVG).to(tl.pointer_type(tl.uint8))
    codes2_ptr = tl.load(entry + COL_EXP_AVG_SQ).to(tl.pointer_type(tl.uint8))
    absmax1_ptr = tl.load(entry + COL_ABSMAX1).to(tl.pointer_type(tl.float32))
    absmax2_ptr = tl.load(entry + COL_ABSMAX2).to(tl.pointer_type(tl.float32))
    codes1 = tl.load(codes1_ptr + slot, mask=selected, other=0).to(tl.int32)
    codes2 = tl.load(codes2_ptr + slot, mask=selected, other=0).to(tl.int32)
    exp_avg = tl.load(qmap1_ptr + codes1) * tl.load(absmax1_ptr + first_block + block, mask=selected, other=0.0)
    exp_avg_sq = tl.load(qmap2_ptr + codes2) * tl.load(absmax2_ptr + first_block + block, mask=selected, other=0.0)

    grad, value = load_grad_and_value(entry, offsets, selected, slot, PARAM_KIND, HAS_MASTER, COMPACT_GRAD)
    exp_avg, exp_avg_sq, value = adamw_update(grad, value, exp_avg, exp_avg_sq, beta1, beta2, one_minus_beta1,
                                              one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps)
    requantise_blocks(exp_avg, selected, block, num_blocks, first_block, absmax1_ptr, codes1_ptr, slot, qmap1_ptr,
                      BLOCKS_PER_TILE)
    requantise_blocks(exp_avg_sq, selected, block, num_blocks, first_block, absmax2_ptr, codes2_ptr, slot, qmap2_ptr,
                      BLOCKS_PER_TILE)
    store_value(entry, offsets, selected, slot, value, seed, PARAM_KIND, HAS_MASTER, STOCHASTIC)
