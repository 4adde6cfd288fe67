"""Masked AdamW as one Triton launch per (dtype, hyperparameters) over all tensors: fp32 compact moments.

Each program takes one non-empty tile (``layout.TILE`` entries) of one tensor, found through two small tables (see
``layout.py``): an int64 table of raw addresses per tensor, and an int32 list of (tensor row, tile) pairs. The program
reads the tile's mask bits, ranks the selected entries with a cumsum, and applies AdamW to them::

    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p * (1 - lr * wd) - step_size * (m / (sqrt(v) / sqrt(1 - beta2**t) + eps))

with correctly rounded ``sqrt``/``/`` and no FMA contraction, so the result is bit-identical to the same sequence of
IEEE fp32 operations on any backend (the numba CPU path, the interpreter, a GPU). The numba port in
:mod:`.masked_adamw_cpu` is this module's twin by design (the same operations for another compiler). The launch
(grid, warps, options) is built by :mod:`.triton_launch`. bf16/fp16 parameters are read
through an fp32 master copy of the selected entries (default) and rounded to nearest even with explicit bit
operations (the interpreter's own fp32->bf16 cast truncates), or stochastically rounded without a master copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import layout

# Globals read inside @triton.jit must be constexpr.
COL_EXP_AVG = tl.constexpr(layout.COL_EXP_AVG)
COL_EXP_AVG_SQ = tl.constexpr(layout.COL_EXP_AVG_SQ)
COL_GRAD = tl.constexpr(layout.COL_GRAD)
COL_MASK_WORDS = tl.constexpr(layout.COL_MASK_WORDS)
COL_MASTER = tl.constexpr(layout.COL_MASTER)
COL_PARAM = tl.constexpr(layout.COL_PARAM)
COL_TENSOR_ID = tl.constexpr(layout.COL_TENSOR_ID)
COL_TILE_OFFSETS = tl.constexpr(layout.COL_TILE_OFFSETS)
_PARAM_FP32 = tl.constexpr(layout.PARAM_FP32)
_PARAM_BF16 = tl.constexpr(layout.PARAM_BF16)
_PARAM_FP16 = tl.constexpr(layout.PARAM_FP16)


@triton.jit
def tile_selection(entry, tile, TILE: tl.constexpr):
    """Selected lanes of ``tile`` and their slot in the tensor's compact state."""
    lanes = tl.arange(0, TILE)
    words_ptr = tl.load(entry + COL_MASK_WORDS).to(tl.pointer_type(tl.int32))
    words = tl.load(words_ptr + tile * (TILE // 32) + lanes // 32)
    bits = (words >> (lanes % 32)) & 1
    rank = tl.cumsum(bits, 0) - bits
    tile_offsets_ptr = tl.load(entry + COL_TILE_OFFSETS).to(tl.pointer_type(tl.int32))
    slot = tl.load(tile_offsets_ptr + tile).to(tl.int64) + rank
    return bits != 0, rank, slot


@triton.jit
def load_as_fp32(address, offsets, mask, PARAM_KIND: tl.constexpr):
    """Load fp32 values, or bf16/fp16 bit patterns widened exactly to fp32."""
    if PARAM_KIND == _PARAM_FP32:
        return tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0.0)
    else:
        bits = tl.load(address.to(tl.pointer_type(tl.int16)) + offsets, mask=mask, other=0)
        if PARAM_KIND == _PARAM_BF16:
            wide = bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            return wide.to(tl.float32, bitcast=True)
        else:
            return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store_from_fp32(address, offsets, values, mask, seed, stream, PARAM_KIND: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store fp32 values, rounded to bf16/fp16 to nearest even, or stochastically (``STOCHASTIC``)."""
    if PARAM_KIND == _PARAM_FP32:
        tl.store(address.to(tl.pointer_type(tl.float32)) + offsets, values, mask=mask)
    else:
        bits = values.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            # Philox stream (seed, offset = tensor id << 32 | entry): the numba path draws the same numbers.
            noise = tl.randint(seed, (stream << 32) | offsets).to(tl.uint32, bitcast=True)
        if PARAM_KIND == _PARAM_BF16:
            if STOCHASTIC:
                bits = bits + (noise & 0xFFFF)
            else:
                bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            out = (bits >> 16).to(tl.uint16)
            out = tl.where(values != values, 0x7FC0, out).to(tl.uint16)
        else:
            if STOCHASTIC:
                # add 13 random bits below fp16's 10-bit mantissa, then truncate: exact for normal fp16 values
                bits = (bits + (noise & 0x1FFF)) & 0xFFFFE000
                rounded = tl.where(values != values, values, bits.to(tl.float32, bitcast=True))
            else:
                rounded = values
            out = rounded.to(tl.float16).to(tl.uint16, bitcast=True)
        tl.store(address.to(tl.pointer_type(tl.int16)) + offsets, out.to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def work_tile(table_ptr, tiles_ptr, NCOLS: tl.constexpr, TILE: tl.constexpr):
    """This program's tile (an entry of the tile list): its tensor's table entry, the tile's flat offsets, and the
    selected lanes with their rank in the tile and their slot in the compact state."""
    pid = tl.program_id(0).to(tl.int64)
    # The (row, tile) int32 pair as one 8-byte load (little-endian: the row is the low word).
    work = tl.load(tiles_ptr.to(tl.pointer_type(tl.int64)) + pid)
    tile = work >> 32
    entry = table_ptr + (work & 0xFFFFFFFF) * NCOLS
    selected, rank, slot = tile_selection(entry, tile, TILE)
    return entry, tile, tile * TILE + tl.arange(0, TILE), selected, rank, slot


@triton.jit
def tensor_addresses(entry, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """(param, grad, exp_avg, exp_avg_sq, master) addresses and the tensor id, each read from the table once and
    before any store: a read after a store could not reuse an earlier one, as the stores might alias the table."""
    param = tl.load(entry + COL_PARAM)
    master = param  # unused without a master copy
    if HAS_MASTER:
        master = tl.load(entry + COL_MASTER)
    stream = param  # unused without stochastic rounding
    if STOCHASTIC:
        stream = tl.load(entry + COL_TENSOR_ID)
    return (param, tl.load(entry + COL_GRAD), tl.load(entry + COL_EXP_AVG), tl.load(entry + COL_EXP_AVG_SQ), master,
            stream)


@triton.jit
def load_grad_and_value(param, grad, master, offsets, selected, slot, PARAM_KIND: tl.constexpr,
                        HAS_MASTER: tl.constexpr, COMPACT_GRAD: tl.constexpr):
    """The selected lanes' gradient and current value (from the fp32 master copy when there is one), as fp32, from
    the tensors at addresses ``param``, ``grad``, ``master``.

    ``COMPACT_GRAD``: the gradient holds only the selected entries, in slot order (see ``sparse_rl.restrict.compact``),
    so it is read at the lanes' slots instead of their flat offsets."""
    grad = load_as_fp32(grad, slot if COMPACT_GRAD else offsets, selected, PARAM_KIND)
    if HAS_MASTER:
        value = tl.load(master.to(tl.pointer_type(tl.float32)) + slot, mask=selected, other=0.0)
    else:
        value = load_as_fp32(param, offsets, selected, PARAM_KIND)
    return grad, value


@triton.jit
def adamw_update(grad, value, exp_avg, exp_avg_sq, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, step_size,
                 bias_correction2_sqrt, eps):
    """New (exp_avg, exp_avg_sq, value): the IEEE operations of the module docstring, in that order."""
    exp_avg = exp_avg * beta1 + grad * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    value = value * decay - step_size * tl.div_rn(exp_avg, denom)
    return exp_avg, exp_avg_sq, value


@triton.jit
def store_value(param, master, stream, offsets, selected, slot, value, seed, PARAM_KIND: tl.constexpr,
                HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Write the new value to the master copy (if any) and, rounded to its dtype, to the parameter."""
    if HAS_MASTER:
        tl.store(master.to(tl.pointer_type(tl.float32)) + slot, value, mask=selected)
    store_from_fp32(param, offsets, value, selected, seed, stream, PARAM_KIND, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])  # not specialised on the seed's value, which changes every step
def masked_adamw_kernel(
    table_ptr,
    tiles_ptr,
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
):
    entry, tile, offsets, selected, rank, slot = work_tile(table_ptr, tiles_ptr, NCOLS, TILE)
    param, grad, exp_avg, exp_avg_sq, master, stream = tensor_addresses(entry, HAS_MASTER, STOCHASTIC)
    exp_avg_ptr = exp_avg.to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = exp_avg_sq.to(tl.pointer_type(tl.float32))
    grad, value = load_grad_and_value(param, grad, master, offsets, selected, slot, PARAM_KIND, HAS_MASTER,
                                      COMPACT_GRAD)
    exp_avg, exp_avg_sq, value = adamw_update(
        grad, value, tl.load(exp_avg_ptr + slot, mask=selected, other=0.0),
        tl.load(exp_avg_sq_ptr + slot, mask=selected, other=0.0), beta1, beta2, one_minus_beta1, one_minus_beta2,
        decay, step_size, bias_correction2_sqrt, eps)
    tl.store(exp_avg_ptr + slot, exp_avg, mask=selected)
    tl.store(exp_avg_sq_ptr + slot, exp_avg_sq, mask=selected)
    store_value(param, master, stream, offsets, selected, slot, value, seed, PARAM_KIND, HAS_MASTER, STOCHASTIC)
