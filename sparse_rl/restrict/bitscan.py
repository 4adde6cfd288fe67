"""Gather and swap a parameter's selected entries straight from the mask's packed bits, on CPU.

The compact gradient hooks and the shared reference visit the selected entries of every trained tensor at every
step. Through int32 positions that costs 4 bytes per selected entry for as long as training runs (51 MiB for a 10%
mask of SmolLM2-135M), on top of the 1 bit per entry the :class:`~sparse_rl.mask.SubnetworkMask` already holds. A
numba loop walks the packed bits instead (``np.packbits`` order: most significant bit first), 64 entries per word
and one step per selected entry (the word's lowest set bit, ``tzcnt``), so the visit needs no memory beyond the
output and runs about as fast as int32 positions (``benchmarks/results/bitscan.md``, a 10% mask of SmolLM2-135M's
134.5M entries, one thread, shared machine: swap 0.077 s against 0.099 s through positions, gather 0.201 s against
0.166 s for ``index_select``; repeated runs move by about 25%). Values are moved as integers of their width, so
every dtype (bf16 included) is copied bit for bit. Without numba, callers fall back to int32 positions
(``available()`` is False).
"""

from __future__ import annotations

import numpy as np
import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_kernels: dict | None = None


def _compile() -> dict | None:
    global _kernels
    if _kernels is None:
        try:
            import numba
        except ImportError:
            _kernels = {}
            return _kernels

        from ..kernels.cpu_common import lowest_bit  # tzcnt, shared with the optimizer's CPU kernels

        m4, m2, m1 = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x3333333333333333), np.uint64(0x5555555555555555)
        one = np.uint64(1)

        @numba.njit(inline="always")
        def entry_order(word):
            """Bit i of the result is entry i of the word's 64 entries: np.packbits puts entry 0 of each byte in
            its most significant bit, so the bits of every byte are reversed."""
            word = ((word >> np.uint64(4)) & m4) | ((word & m4) << np.uint64(4))
            word = ((word >> np.uint64(2)) & m2) | ((word & m2) << np.uint64(2))
            return ((word >> one) & m1) | ((word & m1) << one)

        @numba.njit(nogil=True)
        def visit(values, packed, other, swap):
            """Walk the selected entries in flat order, 64 at a time (the set bits of a word, lowest first), and
            gather them into ``other`` (or exchange them with it); returns the selected count, stopping one past
            ``other``'s length rather than writing beyond it."""
            words = packed.shape[0] // 8
            as_words = packed[: words * 8].view(np.uint64)
            k = 0
            for w in range(words):
                word = entry_order(as_words[w])
                base = 64 * w
                while word:
                    if k == other.shape[0]:
                        return k + 1
                    j = base + lowest_bit(word)
                    if swap:
                        kept = values[j]
                        values[j] = other[k]
                        other[k] = kept
                    else:
                        other[k] = values[j]
                    k += 1
                    word &= word - one
            for b in range(words * 8, packed.shape[0]):  # the last < 8 bytes
                byte = packed[b]
                for j in range(8):
                    if byte & (128 >> j):
                        if k == other.shape[0]:
                            return k + 1
                        if swap:
                            kept = values[8 * b + j]
                            values[8 * b + j] = other[k]
                            other[k] = kept
                        else:
                            other[k] = values[8 * b + j]
                        k += 1
            return k

        _kernels = {"visit": visit}
    return _kernels


def available() -> bool:
    """Whether the packed-bit loops can run (numba importable)."""
    return bool(_compile())


def walks(param: torch.Tensor) -> bool:
    """Whether ``param``'s selected entries are gathered and swapped here (CPU, int32-addressable, numba present)
    rather than through int32 positions: the one rule the compact gradient hooks and the shared reference share."""
    return param.device.type == "cpu" and param.numel() < 2**31 and available()


def _check(flat: torch.Tensor, packed: np.ndarray, count: int, other: torch.Tensor) -> None:
    if flat.device.type != "cpu" or other.device.type != "cpu":
        raise ValueError("packed-bit gather/swap runs on CPU tensors only")
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError("expected a contiguous flat view of the parameter")
    if packed.dtype != np.uint8 or packed.size != (flat.numel() + 7) // 8:
        raise ValueError(f"packed bits of {packed.size} bytes do not fit a tensor of {flat.numel()} entries")
    if other.numel() != count or other.dtype != flat.dtype or not other.is_contiguous():
        raise ValueError(f"expected a contiguous {flat.dtype} vector of {count} selected entries, got "
                         f"{other.dtype} of {other.numel()}")


def gather_selected(flat: torch.Tensor, packed: np.ndarray, count: int) -> torch.Tensor:
    """``flat[selection]`` as a new vector of ``count`` entries, ``selection`` being ``np.unpackbits(packed)``."""
    out = torch.empty(count, dtype=flat.dtype)
    _check(flat, packed, count, out)
    bits = _BITS[flat.element_size()]
    written = _compile()["visit"](flat.view(bits).numpy(), packed, out.view(bits).numpy(), False)
    if written != count:
        raise RuntimeError(f"the packed bits select {written} entries, expected {count}")
    return out


def swap_selected(flat: torch.Tensor, packed: np.ndarray, stored: torch.Tensor) -> None:
    """Exchange ``flat``'s selected entries with ``stored`` in place, bit for bit (an involution)."""
    _check(flat, packed, stored.numel(), stored)
    bits = _BITS[flat.element_size()]
    written = _compile()["visit"](flat.view(bits).numpy(), packed, stored.view(bits).numpy(), True)
    if written != stored.numel():  # cannot be undone safely: the bits disagree with the count the caller holds
        raise RuntimeError(f"the packed bits select {written} entries, expected {stored.numel()}")
