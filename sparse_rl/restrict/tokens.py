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

Where the selection meets a trainer (TRL 1.16):

- GRPO (and GMPO), RLOO, DPO, SFT, KTO call ``model(..., labels=..., fused_lm_head=True)``, the forward TRL patches
  in with ``trl.trainer.utils.add_fused_lm_head``; it returns per-token ``log_probs`` and ``entropy``.
  :func:`restricted_fused_forward` wraps that forward and, for calls with gradients enabled, replaces ``log_probs``
  (and ``entropy``, which the GRPO entropy bonus differentiates) by ``where(keep, x, x.detach())``. Reference and
  old-policy log-probs run under ``torch.no_grad()`` and are left alone.
- OnlineDPO (``trl.experimental``) computes log-probs from the full logits in ``OnlineDPOTrainer._forward``;
  :func:`restricted_online_dpo_forward` wraps that method and computes the entropy from the logits it already
  materialises.

Both build the replacement only; ``sparse_rl.trl.patches`` installs it on the trainer and returns its undo. The TRL
code shapes they rely on are listed in :mod:`sparse_rl._compat`.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._compat import has_fused_lm_head


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


def restricted_fused_forward(model: torch.nn.Module, tokens: HighEntropyTokens) -> types.MethodType:
    """A replacement for the fused LM-head forward TRL patched onto ``model`` through which only the tokens
    ``tokens`` selects pass a gradient (see the module docstring)."""
    if not has_fused_lm_head(model):
        raise ValueError("model.forward is not TRL's fused LM-head forward; call "
                         "trl.trainer.utils.add_fused_lm_head(model, outputs=('log_probs', 'entropy'))")
    fused_forward = model.forward
    aux_loss_coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)

    # A bound method with the model's own signature, like TRL's patch: `generate` validates kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        outputs = fused_forward(*args, fused_lm_head=fused_lm_head, **kwargs)
        if not fused_lm_head or not torch.is_grad_enabled():
            return outputs
        if outputs.entropy is None:
            raise RuntimeError("entropy_quantile needs the fused forward to return per-token entropy; this trainer "
                               "patched its LM head without the 'entropy' output")
        keep = tokens.select(outputs.entropy, outputs.label_mask)
        log_probs = keep_gradient_of(outputs.log_probs, keep)
        outputs["log_probs"] = log_probs
        if outputs.entropy.requires_grad:
            outputs["entropy"] = keep_gradient_of(outputs.entropy, keep)
        # Same value as the fused forward's own loss (the kept values are the same numbers), restricted gradient.
        num_items_in_batch = kwargs.get("num_items_in_batch")
        denominator = outputs.label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denominator
        if outputs.aux_loss is not None:
            loss = loss + aux_loss_coef * outputs.aux_loss
        outputs["loss"] = loss
        return outputs

    return types.MethodType(forward, model)


def restricted_online_dpo_forward(trainer, tokens: HighEntropyTokens) -> Callable:
    """A replacement for ``OnlineDPOTrainer._forward``: it returns completion log-probs computed from full logits,
    which a forward hook on the policy captures to compute the entropies."""
    policy = trainer.model
    original_forward = trainer._forward

    def _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        if not torch.is_grad_enabled():  # the reference model's call
            return original_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        captured = []
        handle = policy.register_forward_hook(lambda module, args, output: captured.append(output.logits))
        try:
            log_probs = original_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                         vision_inputs)
        finally:
            handle.remove()
        logits, num_completion = captured[-1], completion_ids.size(1)
        # `_forward` reads the logit before each completion token: positions [L-C-1, L-1) after a prompt, else [0, C)
        length = logits.size(1)
        positions = slice(length - num_completion - 1, length - 1) if length > num_completion else slice(0, None)
        entropy = token_entropy_from_logits(logits[:, positions])
        keep = tokens.select(entropy, completion_mask.bool())
        return keep_gradient_of(log_probs, keep)

    return _forward
