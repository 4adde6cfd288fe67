"""Exact top-k selection of float scores without a whole-tensor sort.

``torch.topk`` on CPU builds a (value, int64 index) pair per entry when k is a large share of n: 16 bytes per entry,
453 MiB on SmolLM2's 28M-entry embedding, which set the process's memory peak of a whole sparse training run. Here the
k-th largest score is found by a two-pass radix select over order-preserving 32-bit keys of the scores, chunk by
chunk (65536-bucket histograms of the high, then the low 16 bits), so the extra memory is a few chunk-sized
temporaries. Selected: every score above the threshold, then the entries equal to it in flat order (lowest index first,
across tensors in the order given) until exactly k are chosen. ``-0.0`` counts as equal to ``0.0``, as in a float
comparison.

Ties and ``torch.topk``: without ties at the threshold both select the same set. With ties, topk's choice among the
tied entries is implementation-defined; this rule is documented and deterministic. Masks drawn by sparse_rl before this
module (``torch.topk``) can therefore differ in a few tied entries; ``benchmarks/bench_mask_select.py`` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK = 1 << 22  # entries per pass step: four 16 MiB int32/bool temporaries at most
_BUCKETS = 1 << 16


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 scores: flip the magnitude bits of negatives (``-0.0`` made ``0.0`` first)."""
    bits = (chunk.float() + 0.0).view(torch.int32)  # -0.0 + 0.0 == +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _chunks(scores: Sequence[torch.Tensor]):
    for score in scores:
        flat = score.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            yield flat[start:start + CHUNK].cpu()


def _bucket_from_top(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many entries lie in the buckets above it."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, k))  # first position where the count from the top reaches k
    bucket = _BUCKETS - 1 - index
    return bucket, int(from_top[index - 1]) if index else 0


def kth_largest_key(scores: Sequence[torch.Tensor], k: int) -> int:
    """The order-preserving key of the k-th largest score over ``scores`` pooled (1 <= k <= total entries)."""
    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for chunk in _chunks(scores):
        high += torch.bincount((_keys(chunk) >> 16).long() + (_BUCKETS // 2), minlength=_BUCKETS)
    bucket, above = _bucket_from_top(high, k)
    top = bucket - _BUCKETS // 2  # the signed high half of the threshold key
    low = torch.zeros(_BUCKETS, dtype=torch.int64)
    for chunk in _chunks(scores):
        keys = _keys(chunk)
        low += torch.bincount((keys[(keys >> 16) == top] & 0xFFFF).long(), minlength=_BUCKETS)
    low_bucket, _ = _bucket_from_top(low, k - above)
    return (top << 16) | low_bucket


def top_k_selections(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean tensors (shapes of ``scores``, on CPU) selecting exactly the ``k`` largest scores over all of them
    pooled; ties at the threshold go to the earliest tensors and positions."""
    total = sum(s.numel() for s in scores)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must lie in 1..{total}, the number of scores")
    if k == total:
        return [torch.ones(s.shape, dtype=torch.bool) for s in scores]
    threshold = kth_largest_key(scores, k)
    selections, remaining = [], k
    for score in scores:
        selection = torch.empty(score.numel(), dtype=torch.bool)
        flat = score.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = selection[start:start + CHUNK]
            torch.gt(_keys(flat[start:start + CHUNK].cpu()), threshold, out=part)
            remaining -= int(torch.count_nonzero(part))
        selections.append(selection)
    for score, selection in zip(scores, selections):
        flat = score.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            if remaining <= 0:
                break
            ties = (_keys(flat[start:start + CHUNK].cpu()) == threshold).nonzero().squeeze(1)[:remaining]
            selection[start + ties] = True
            remaining -= ties.numel()
    return [selection.reshape(score.shape) for score, selection in zip(scores, selections)]
