"""The producer's inner loops on CPU (numba): finding the selected entries whose bf16 value changed since the last
patch.

Two ways, both one pass:

- :func:`changed_bf16` (the *scan*): reads the selected entries of an fp32 parameter at their flat indices, rounds
  each to bf16 and compares it with the last-sent bits. The torch path needs four passes and two d·N temporaries
  (gather, cast, compare, ``nonzero``); this loop reads each selected entry once, but it still reads them where they
  lie in the dense tensor: at 10% random density that touches most cache lines of the parameter.
- :func:`changed_compact` (the *fused scan*): compares two compact bf16 vectors, the rounded copy that
  ``MaskedAdamW`` writes during its step (:meth:`sparse_rl.optim.MaskedAdamW.track_rounded`) and the last-sent
  values, 4 entries per 64-bit compare. Both are in slot order, which is the mask's flat-index order, so a changed
  entry's slot is its rank in the selection, what the patch encodes; :func:`flat_of_ranks` turns ranks into flat
  indices from the optimizer's selection bitmask when a patch needs them.

Rounding is round-to-nearest-even with every NaN mapped to ``0xFFFF``: what ``tensor.to(torch.bfloat16)`` gives on
CPU (the vectorised conversion, ``ATen/cpu/vec/vec512/vec512_bfloat16.h`` ``cvtfp32_bf16``, blends NaNs to
``0xffff``; c10's scalar ``round_to_nearest_even`` would give ``0x7FC0``, and CUDA tensors take the torch path
anyway); the fused scan's step uses the same function
(:func:`sparse_rl.kernels.cpu_common.bf16_bits_as_torch_cpu`). Tests compare both with torch on random bit patterns,
NaNs, infinities and subnormals included.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba

    from ..kernels.cpu_common import bf16_bits_as_torch_cpu, lowest_bit, popcount
except ImportError:  # the torch path in PatchProducer covers everything without it
    numba = None


if numba is not None:
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _changed_bf16(flat_bits, index, last, ranks_out, values_out):  # pragma: no cover - compiled
        count = 0
        for i in range(index.shape[0]):
            b = bf16_bits_as_torch_cpu(flat_bits[index[i]])
            if b != last[i]:
                last[i] = b
                ranks_out[count] = i
                values_out[count] = b
                count += 1
        return count

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _changed_compact(current, last, current_words, last_words, ranks_out, values_out):  # pragma: no cover
        count = 0
        for w in range(current_words.shape[0]):
            if current_words[w] == last_words[w]:
                continue
            for i in range(4 * w, 4 * w + 4):
                if current[i] != last[i]:
                    last[i] = current[i]
                    ranks_out[count] = i
                    values_out[count] = current[i]
                    count += 1
        for i in range(4 * current_words.shape[0], current.shape[0]):
            if current[i] != last[i]:
                last[i] = current[i]
                ranks_out[count] = i
                values_out[count] = current[i]
                count += 1
        return count

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _flat_of_ranks(words, tile_offsets, ranks, out):  # pragma: no cover - compiled
        tile = 0
        for i in range(ranks.shape[0]):
            rank = ranks[i]
            while tile_offsets[tile + 1] <= rank:
                tile += 1
            within = rank - tile_offsets[tile]
            w = tile * 32
            while popcount(words[w]) <= within:
                within -= popcount(words[w])
                w += 1
            word = words[w]
            for _ in range(within):
                word &= word - np.uint32(1)
            out[i] = w * 32 + lowest_bit(word)


class _GapVarints:
    """LEB128 varints of the gaps between sorted ranks (``rank_gaps`` in :mod:`.patch`), compiled: the numpy code
    there takes a dozen array passes per tensor, most of a small patch's build time."""

    @staticmethod
    def total_bytes(ranks: np.ndarray) -> int:
        return _gap_varint_bytes(ranks)

    @staticmethod
    def encode(ranks: np.ndarray, total: int) -> np.ndarray:
        out = np.empty(total, dtype=np.uint8)
        _gap_varint_encode(ranks, out)
        return out


if numba is not None:
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _gap_varint_bytes(ranks):  # pragma: no cover - compiled
        total = 0
        previous = -1
        for i in range(ranks.shape[0]):
            gap = ranks[i] - previous - 1
            previous = ranks[i]
            total += 1
            while gap >= 128:
                gap >>= 7
                total += 1
        return total

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _gap_varint_encode(ranks, out):  # pragma: no cover - compiled
        position = 0
        previous = -1
        for i in range(ranks.shape[0]):
            gap = ranks[i] - previous - 1
            previous = ranks[i]
            while gap >= 128:
                out[position] = (gap & 0x7F) | 0x80
                gap >>= 7
                position += 1
            out[position] = gap
            position += 1

    gap_varints = _GapVarints()
else:
    gap_varints = None


def scan_available(param: torch.Tensor, dtype: torch.dtype) -> bool:
    return numba is not None and param.dtype == torch.float32 and dtype == torch.bfloat16 and param.device.type == "cpu"


def changed_bf16(param: torch.Tensor, index: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (int64, positions in ``index``) and new bf16 values of the entries ``param.view(-1)[index]`` whose bf16
    rounding differs from ``last`` (bf16, one per index); ``last`` is updated in place."""
    flat_bits = param.detach().reshape(-1).view(torch.int32).numpy().view(np.uint32)
    last_bits = last.view(torch.int16).numpy().view(np.uint16)
    ranks = np.empty(index.numel(), dtype=np.int64)
    values = np.empty(index.numel(), dtype=np.uint16)
    count = _changed_bf16(flat_bits, index.numpy(), last_bits, ranks, values)
    return (torch.from_numpy(ranks[:count].copy()),
            torch.from_numpy(values[:count].view(np.int16).copy()).view(torch.bfloat16))


def changed_compact(current: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (int64) and values of the entries where the 2-byte CPU vectors ``current`` and ``last`` differ in bits;
    ``last`` is updated in place. Without numba: the same with torch ops."""
    int_current, int_last = current.view(torch.int16), last.view(torch.int16)
    if numba is None:
        changed = (int_current != int_last).nonzero().squeeze(1)
        values = current.index_select(0, changed)
        last.index_copy_(0, changed, values)
        return changed, values
    current_bits, last_bits = int_current.numpy().view(np.uint16), int_last.numpy().view(np.uint16)
    whole = current_bits.size // 4 * 4
    ranks = np.empty(current_bits.size, dtype=np.int64)
    values = np.empty(current_bits.size, dtype=np.uint16)
    count = _changed_compact(current_bits, last_bits, current_bits[:whole].view(np.uint64),
                             last_bits[:whole].view(np.uint64), ranks, values)
    return (torch.from_numpy(ranks[:count].copy()),
            torch.from_numpy(values[:count].view(np.int16).copy()).view(current.dtype))


def flat_of_ranks(mask_words: torch.Tensor, tile_offsets: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Flat indices (int32) of the selected entries with the sorted ``ranks``, from a selection's bitmask and per-tile
    offsets (:class:`sparse_rl.kernels.layout.SelectionLayout`, on CPU)."""
    ranks_np = ranks.numpy().astype(np.int64, copy=False)
    out = np.empty(ranks_np.size, dtype=np.int32)
    if numba is None:  # pragma: no cover - numba is a dependency of the CPU optimizer path
        bits = np.unpackbits(mask_words.numpy().view(np.uint8), bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits)[ranks_np].astype(np.int32))
    _flat_of_ranks(mask_words.numpy().view(np.uint32), tile_offsets.numpy(), ranks_np, out)
    return torch.from_numpy(out)
