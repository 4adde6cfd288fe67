"""Gather and swap a parameter's selected entries straight from the mask's packed bits, on CPU.

The compact gradient hooks and the shared reference visit the selected entries of every trained tensor at every
step. Through int32 positions that costs 4 bytes per selected entry for as long as training runs (51 MiB for a 10%
mask of SmolLM2-135M), on top of the 1 bit per entry the :class:`~sparse_rl.mask.SubnetworkMask` already holds. These
numba loops walk the packed bits instead (``np.packbits`` order: most significant bit first), skipping empty bytes,
so the visit needs no memory beyond the output. Values are moved as integers of their width, so every dtype (bf16
included) is copied bit for bit. Without numba, callers fall back to int32 positions (``available()`` is False).
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

        @numba.njit(nogil=True, cache=False)
        def gather(values, packed, out):
            k = 0
            for b in range(packed.shape[0]):
                byte = packed[b]
                if byte == 0:
                    continue
                base = 8 * b
                for j in range(8):
                    if byte & (128 >> j):
                        if k == out.shape[0]:  # more bits than the caller's count: stop, never write past
                            return k + 1
                        out[k] = values[base + j]
                        k += 1
            return k

        @numba.njit(nogil=True, cache=False)
        def swap(values, packed, other):
            k = 0
            for b in range(packed.shape[0]):
                byte = packed[b]
                if byte == 0:
                    continue
                base = 8 * b
                for j in range(8):
                    if byte & (128 >> j):
                        if k == other.shape[0]:
                            return k + 1
                        kept = values[base + j]
                        values[base + j] = other[k]
                        other[k] = kept
                        k += 1
            return k

        _kernels = {"gather": gather, "swap": swap}
    return _kernels


def available() -> bool:
    """Whether the packed-bit loops can run (numba importable)."""
    return bool(_compile())


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
    written = _compile()["gather"](flat.view(bits).numpy(), packed, out.view(bits).numpy())
    if written != count:
        raise RuntimeError(f"the packed bits select {written} entries, expected {count}")
    return out


def swap_selected(flat: torch.Tensor, packed: np.ndarray, stored: torch.Tensor) -> None:
    """Exchange ``flat``'s selected entries with ``stored`` in place, bit for bit (an involution)."""
    _check(flat, packed, stored.numel(), stored)
    bits = _BITS[flat.element_size()]
    written = _compile()["swap"](flat.view(bits).numpy(), packed, stored.view(bits).numpy())
    if written != stored.numel():  # cannot be undone safely: the bits disagree with the count the caller holds
        raise RuntimeError(f"the packed bits select {written} entries, expected {stored.numel()}")
