"""The producer's inner loop on CPU: one pass over the selected entries of an fp32 tensor that rounds each to bf16,
compares it with the last-sent bits and records the ones that changed (numba).

The torch path needs four passes and two d·N temporaries (gather, cast, compare, ``nonzero``); this loop reads each
selected entry once. Rounding is round-to-nearest-even with every NaN mapped to ``0xFFFF``: what
``tensor.to(torch.bfloat16)`` gives on CPU (the vectorised conversion, ``ATen/cpu/vec/vec512/vec512_bfloat16.h``
``cvtfp32_bf16``, blends NaNs to ``0xffff``; c10's scalar ``round_to_nearest_even`` would give ``0x7FC0``, and CUDA
tensors take the torch path anyway). Tests compare the two on random bit patterns, NaNs, infinities and subnormals
included.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # the torch path in PatchProducer covers everything without it
    numba = None


if numba is not None:
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _changed_bf16(flat_bits, index, last, ranks_out, values_out):  # pragma: no cover - compiled
        count = 0
        for i in range(index.shape[0]):
            u = np.int64(flat_bits[index[i]])
            if (u & 0x7FFFFFFF) > 0x7F800000:
                b = 0xFFFF
            else:
                b = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16) & 0xFFFF
            if b != last[i]:
                last[i] = b
                ranks_out[count] = i
                values_out[count] = b
                count += 1
        return count


def fused_scan_available(param: torch.Tensor, dtype: torch.dtype) -> bool:
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
