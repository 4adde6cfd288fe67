"""Compact layout of a masked tensor's optimizer state: a 1-bit mask plus per-tile prefix offsets.

A flattened parameter of ``n`` entries is cut into tiles of ``TILE`` (1024) entries. For each tensor we keep

* ``mask_words``: the selection as bits, ``TILE // 32`` int32 words per tile, entry ``i`` is bit ``i % 32`` of word
  ``i // 32`` (1 bit per parameter);
* ``tile_offsets``: int32, ``tile_offsets[t]`` = number of selected entries before tile ``t`` (4 bytes per tile).

The compact state vectors (moments, master copy) hold the ``k`` selected entries in flat-index order, so the slot of
entry ``i`` is ``tile_offsets[i // TILE] + (selected entries before i inside its tile)``. Per *total* parameter this
costs 0.125 + 0.004 bytes of layout, against 4 bytes per *selected* entry for an int32 index list: the bitmask wins
above a density of ~3%, and the slot of an entry is found with one popcount/cumsum inside a tile, without a search.

With 8-bit state, moments are quantised in blocks: the selected entries of one tile, split by rank into blocks of
``QUANT_BLOCK`` (256) -- at density 100% these are exactly bitsandbytes' blocks of 256 consecutive entries.
``block_offsets[t]`` (int32) is the index of tile ``t``'s first block in the ``absmax`` vectors.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch

TILE = 1024
WORDS_PER_TILE = TILE // 32
QUANT_BLOCK = 256
BLOCKS_PER_TILE = TILE // QUANT_BLOCK


@dataclass
class SelectionLayout:
    """Bitmask + per-tile offsets of one tensor (see module docstring), on the parameter's device."""

    numel: int
    num_selected: int
    mask_words: torch.Tensor  # int32 [num_tiles * WORDS_PER_TILE]
    tile_offsets: torch.Tensor  # int32 [num_tiles + 1]
    block_offsets: torch.Tensor  # int32 [num_tiles + 1], first quantisation block of each tile
    num_blocks: int

    @property
    def num_tiles(self) -> int:
        return self.tile_offsets.numel() - 1

    def nbytes(self, quantised: bool) -> int:
        """Bytes of the layout itself (bitmask, tile offsets, and block offsets when the state is quantised)."""
        total = self.mask_words.numel() * 4 + self.tile_offsets.numel() * 4
        return total + (self.block_offsets.numel() * 4 if quantised else 0)

    @classmethod
    def from_selection(cls, selection: torch.Tensor, device: torch.device | str = "cpu") -> SelectionLayout:
        if selection.dtype != torch.bool:
            raise TypeError(f"selection must be a bool tensor, got {selection.dtype}")
        if sys.byteorder != "little":  # the packed bytes are reinterpreted as little-endian int32 words
            raise RuntimeError("SelectionLayout needs a little-endian machine")
        flat = selection.detach().reshape(-1).cpu().numpy()
        numel = flat.size
        if numel >= 2**31:
            raise ValueError(f"tensors of {numel} entries (>= 2**31) are not supported by the masked AdamW layout")
        num_tiles = -(-numel // TILE)
        padded = np.zeros(num_tiles * TILE, dtype=bool)
        padded[:numel] = flat
        words = np.packbits(padded, bitorder="little").view(np.int32)
        counts = padded.reshape(num_tiles, TILE).sum(axis=1, dtype=np.int64)
        tile_offsets = np.zeros(num_tiles + 1, dtype=np.int64)
        np.cumsum(counts, out=tile_offsets[1:])
        blocks = -(-counts // QUANT_BLOCK)
        block_offsets = np.zeros(num_tiles + 1, dtype=np.int64)
        np.cumsum(blocks, out=block_offsets[1:])
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return cls(
            numel=numel,
            num_selected=int(tile_offsets[-1]),
            mask_words=as_tensor(words),
            tile_offsets=as_tensor(tile_offsets.astype(np.int32)),
            block_offsets=as_tensor(block_offsets.astype(np.int32)),
            num_blocks=int(block_offsets[-1]),
        )


# Columns of the per-launch tensor table: one int64 row per tensor, holding raw addresses, so that a single launch
# (Triton program grid or numba parallel loop) steps tensors of any shapes without concatenating them.
COL_PARAM = 0
COL_GRAD = 1
COL_EXP_AVG = 2
COL_EXP_AVG_SQ = 3
COL_MASTER = 4
COL_MASK_WORDS = 5
COL_TILE_OFFSETS = 6
COL_ABSMAX1 = 7
COL_ABSMAX2 = 8
COL_BLOCK_OFFSETS = 9
COL_TENSOR_ID = 10
COL_NUMEL = 11  # entries of the tensor: the CPU block path must not read or write 16-entry blocks past its end
# Optional (0 when unused, CPU paths only): a uint16 vector of ``k`` entries that the step fills with the new selected
# values rounded to bf16 as ``tensor.to(torch.bfloat16)`` rounds on CPU, in slot order (the weight sync's fused scan,
# ``MaskedAdamW.track_rounded``).
COL_ROUNDED = 12
# Rows padded to 16 columns (128 B): with 13 (104 B rows) the AMD backend could no longer prove a row's alignment and
# split its merged scalar loads of the columns in two (benchmarks/results/kernel_compile.md, gfx942 table loads).
TABLE_COLUMNS = 16

PARAM_FP32 = 0
PARAM_BF16 = 1
PARAM_FP16 = 2
PARAM_KINDS = {torch.float32: PARAM_FP32, torch.bfloat16: PARAM_BF16, torch.float16: PARAM_FP16}


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def tensor_table_row(
    *,
    param: torch.Tensor,
    grad: torch.Tensor,
    layout: SelectionLayout,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None = None,
    absmax1: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    tensor_id: int = 0,
    rounded: torch.Tensor | None = None,
) -> list[int]:
    row = [0] * TABLE_COLUMNS
    row[COL_PARAM] = _address(param)
    row[COL_GRAD] = _address(grad)
    row[COL_EXP_AVG] = _address(exp_avg)
    row[COL_EXP_AVG_SQ] = _address(exp_avg_sq)
    row[COL_MASTER] = _address(master)
    row[COL_MASK_WORDS] = _address(layout.mask_words)
    row[COL_TILE_OFFSETS] = _address(layout.tile_offsets)
    row[COL_ABSMAX1] = _address(absmax1)
    row[COL_ABSMAX2] = _address(absmax2)
    row[COL_BLOCK_OFFSETS] = _address(layout.block_offsets)
    row[COL_TENSOR_ID] = tensor_id
    row[COL_NUMEL] = layout.numel
    row[COL_ROUNDED] = _address(rounded)
    return row


def tile_table(layouts: list[SelectionLayout], device: torch.device | str) -> torch.Tensor:
    """int32 ``[num_work_tiles, 2]``: (row in the tensor table, tile index in that tensor) for every non-empty tile."""
    parts = []
    for row, layout in enumerate(layouts):
        counts = layout.tile_offsets.to("cpu").diff()
        tiles = counts.nonzero().squeeze(1).to(torch.int32)
        parts.append(torch.stack([torch.full_like(tiles, row), tiles], dim=1))
    table = torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.int32)
    return table.contiguous().to(device)


@dataclass(frozen=True)
class KernelVariant:
    """The compile-time choices of a launch (the Triton kernels' constexprs; arguments of the numba paths).

    ``param_dtype``: the parameters' dtype (all tensors of a launch share it); ``has_master``: they have fp32 master
    copies of their selected entries; ``stochastic_rounding``: bf16/fp16 values are rounded stochastically instead of
    to nearest even; ``compact_grad``: the gradients hold the selected entries only, in slot order
    (:mod:`sparse_rl.restrict.compact`), instead of every entry; ``state_bits``: 32 for fp32 moments, 8 for uint8 codes
    into :func:`quantisation_maps` with an fp32 absmax per block.
    """

    param_dtype: torch.dtype
    has_master: bool = False
    stochastic_rounding: bool = False
    compact_grad: bool = False
    state_bits: int = 32

    def __post_init__(self):
        if self.param_dtype not in PARAM_KINDS:
            raise TypeError(f"the kernels step float32, bfloat16 and float16 parameters, got {self.param_dtype}")
        if self.state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {self.state_bits!r}")
        if self.param_dtype == torch.float32 and (self.has_master or self.stochastic_rounding):
            raise ValueError("fp32 parameters take no master copy and no stochastic rounding")
        if self.has_master and self.stochastic_rounding:
            raise ValueError("stochastic rounding replaces the fp32 master copy: not both")

    @property
    def name(self) -> str:
        rounding = "master" if self.has_master else "stochastic" if self.stochastic_rounding else "nearest"
        dtype = str(self.param_dtype).removeprefix("torch.")
        return f"{dtype}-{rounding}-{'compact' if self.compact_grad else 'dense'}-{self.state_bits}bit"

    @classmethod
    def all(cls) -> list[KernelVariant]:
        """Every variant ``MaskedAdamW`` can launch: fp32 parameters (no master copy, nearest rounding), bf16/fp16
        parameters with a master copy, stochastic rounding or neither; dense or compact gradients; fp32 or 8-bit
        state."""
        roundings = [(torch.float32, False, False)]
        roundings += [(dtype, master, stochastic) for dtype in (torch.bfloat16, torch.float16)
                      for master, stochastic in ((True, False), (False, True), (False, False))]
        return [cls(dtype, master, stochastic, compact, bits)
                for bits in (32, 8) for compact in (True, False) for dtype, master, stochastic in roundings]


def _fp32(x: float) -> float:
    return float(np.float32(x))


@dataclass(frozen=True)
class AdamWScalars:
    """Per-launch runtime scalars, rounded to fp32 once on the host so every backend multiplies by the same numbers.

    They are ordinary kernel arguments (not constexpr): changing lr or betas between steps never recompiles.
    """

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    decay: float  # 1 - lr * weight_decay
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    eps: float
    seed: int  # stochastic rounding stream of this step

    @classmethod
    def for_step(cls, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                 seed: int = 0) -> AdamWScalars:
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        return cls(
            beta1=_fp32(beta1),
            beta2=_fp32(beta2),
            one_minus_beta1=_fp32(1.0 - beta1),
            one_minus_beta2=_fp32(1.0 - beta2),
            decay=_fp32(1.0 - lr * weight_decay),
            step_size=_fp32(lr / (1.0 - beta1**step)),
            bias_correction2_sqrt=_fp32((1.0 - beta2**step) ** 0.5),
            eps=_fp32(eps),
            seed=(seed * 0x9E3779B1 + step * 0x85EBCA77 + 0x165667B1) % 2**31,
        )


@functools.cache
def quantisation_maps(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 256-entry dynamic maps: signed (for ``exp_avg``) and unsigned (for ``exp_avg_sq``)."""
    try:
        from bitsandbytes.functional import create_dynamic_map
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("state_bits=8 uses bitsandbytes' quantisation maps: pip install 'sparse-rl[bnb]'") from error
    return create_dynamic_map(signed=True).to(device), create_dynamic_map(signed=False).to(device)
