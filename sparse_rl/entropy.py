"""High-entropy token selection: keep the loss gradient of the top-q highest-entropy completion tokens only.

RL improvements concentrate on the few "forking" tokens where the policy is uncertain (Wang et al. 2025, "Beyond the
80/20 rule"); training on the top 20% highest-entropy tokens matches or beats training on all of them. Here the
restriction is applied to the per-token log-probs a trainer's loss is built from::

    log_probs = torch.where(keep, log_probs, log_probs.detach())

Forward values (ratios, margins, rewards, the logged loss) are unchanged; only the tokens in ``keep`` send a gradient.
The loss is therefore normalised exactly as the trainer normalises it (by all completion tokens for GRPO's default
``dapo`` loss, TRL-style), not by the selected tokens only as in the paper's verl code.

The threshold is computed over the completion tokens of one training forward (one micro-batch under gradient
accumulation) gathered from every process, like TRL's ``top_entropy_quantile``, and agrees with it exactly: a token
is kept when its entropy is ``>= torch.quantile(all_entropies, 1 - q)`` (linear interpolation). ``torch.quantile``
refuses inputs above 2**24 elements, so the two order statistics it interpolates are found with ``kthvalue`` instead.

This module is plain PyTorch; ``sparse_rl.trl`` decides where in each trainer the selection is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


def gather_across_processes(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every process (identity without ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world_size = dist.get_world_size()
    local_count = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    counts = [torch.zeros_like(local_count) for _ in range(world_size)]
    dist.all_gather(counts, local_count)
    counts = [int(c.item()) for c in counts]
    padded = values.new_zeros(max(counts))
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:count] for g, count in zip(gathered, counts)])


def entropy_quantile_threshold(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """``torch.quantile(values, 1 - quantile)`` (linear interpolation) for a non-empty 1-D tensor of any size.

    The rank is computed in ``values.dtype`` as ``torch.quantile`` does, so the result is bit-identical to it.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of entropies, got shape {tuple(values.shape)}")
    rank = float(torch.tensor(1.0 - quantile, dtype=values.dtype) * (values.numel() - 1))
    below = values.kthvalue(math.floor(rank) + 1).values
    above = values.kthvalue(math.ceil(rank) + 1).values
    weight = torch.tensor(rank - math.floor(rank), dtype=values.dtype, device=values.device)
    return below.lerp(above, weight)


@dataclass
class TokenSelection:
    """Which tokens keep their gradient, and the numbers behind it (over all processes)."""

    keep: torch.Tensor  # bool, same shape as the entropies; False on padding / prompt tokens
    threshold: float  # entropy a valid token needs to be kept (nan when there was no valid token)
    num_kept: int
    num_valid: int


def select_high_entropy_tokens(entropy: torch.Tensor, valid: torch.Tensor, quantile: float) -> TokenSelection:
    """Keep the valid tokens whose entropy is at least the batch-wide ``1 - quantile`` quantile.

    Args:
        entropy: per-token entropy, any shape (e.g. ``(batch, seq_len)``).
        valid: bool tensor of the same shape, True on completion tokens that enter the loss.
        quantile: share of tokens to keep in [0, 1]; 0 keeps only the highest-entropy token (as TRL does).
    """
    if entropy.shape != valid.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and valid {tuple(valid.shape)} must have the same shape")
    check_entropy_quantile(quantile)
    valid = valid.bool()
    entropy = entropy.detach()
    gathered = gather_across_processes(entropy[valid].float())
    if gathered.numel() == 0:
        return TokenSelection(torch.zeros_like(valid), float("nan"), 0, 0)
    threshold = entropy_quantile_threshold(gathered, quantile)
    keep = valid & (entropy.float() >= threshold)
    return TokenSelection(keep, float(threshold), int((gathered >= threshold).sum()), gathered.numel())


def keep_gradient_of(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Same values; gradient only through the entries where ``keep`` is True."""
    return torch.where(keep, values, values.detach())


@torch.no_grad()
def token_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, in fp32 (for trainers that materialise logits)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


class HighEntropyTokens:
    """Selects tokens forward by forward and keeps the statistics until the trainer logs them."""

    def __init__(self, quantile: float):
        check_entropy_quantile(quantile)
        self.quantile = quantile
        self._kept_fractions: list[float] = []
        self._thresholds: list[float] = []

    def select(self, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        selection = select_high_entropy_tokens(entropy, valid, self.quantile)
        if selection.num_valid:
            self._kept_fractions.append(selection.num_kept / selection.num_valid)
            self._thresholds.append(selection.threshold)
        return selection.keep

    def pop_metrics(self) -> dict[str, float]:
        """Mean kept share and threshold since the last call (empty if no training forward ran)."""
        if not self._kept_fractions:
            return {}
        metrics = {
            "sparse/entropy_kept_fraction": sum(self._kept_fractions) / len(self._kept_fractions),
            "sparse/entropy_threshold": sum(self._thresholds) / len(self._thresholds),
        }
        self._kept_fractions.clear()
        self._thresholds.clear()
        return metrics


def check_entropy_quantile(quantile: float) -> None:
    if not isinstance(quantile, (int, float)) or not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"entropy_quantile must be in [0, 1] (share of completion tokens kept), got {quantile!r}")
