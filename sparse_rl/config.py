"""``SparseConfig``: everything that decides how a trainer is made sparse, in one dataclass (PEFT/TRL style)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .mask import SubnetworkMask
from .restrict.tokens import check_entropy_quantile

PROBE_SCORES = ("gradient", "fisher", "adam", "precision")
PROBE_BUDGETS = ("per_tensor", "global")


@dataclass
class SparseConfig:
    """How to choose and train the subnetwork.

    Args:
        density: share of the entries of each trained matrix that is selected, in (0, 1]. The research finds RL
            updates 5-30% of parameters; 0.1 is a middle value.
        discovery: how to pick the entries when no ``mask`` is given. ``"gradient"`` runs ``probe_steps`` batches of
            the trainer's own loss and keeps the entries with the largest accumulated |gradient| in every matrix;
            ``"random"`` draws a uniform random subset (a strong baseline in the literature).
        probe_steps: batches of the real loss used by ``"gradient"`` discovery.
        probe_score: what the probe accumulates per entry (see :func:`sparse_rl.discovery.accumulate_gradient_scores`):
            ``"gradient"`` |g| (default), ``"fisher"`` g², ``"adam"`` the size of the AdamW update the entry would
            get, ``"precision"`` that update relative to half a bf16 ulp of the weight.
        probe_budget: ``"per_tensor"`` keeps ``density`` of every matrix (the research finds updates spread over
            nearly all matrices); ``"global"`` keeps the top ``density`` of all entries, wherever they are.
        mask: a ready :class:`SubnetworkMask` or a path to one saved with ``SubnetworkMask.save``; overrides
            ``discovery``/``density``.
        exclude: substrings of parameter names that stay frozen (e.g. ``("embed_tokens",)``). Discovery skips them; a
            given ``mask`` must not select any of their entries.
        master_weights: fp32 copy of the selected entries of bf16/fp16 weights, so tiny RL updates are not rounded
            away.
        state_bits: 32 keeps fp32 moments; 8 stores them blockwise-quantised (about 4x less optimizer state).
        stochastic_rounding: round bf16/fp16 weights stochastically instead of keeping an fp32 master copy (needs
            ``master_weights=False``).
        shared_reference: replace the trainer's reference model (DPO, KTO, GRPO/RLOO with ``beta != 0``) by the
            policy itself with the original values of the selected entries swapped in for reference forwards
            (:class:`sparse_rl.reference.SharedReference`); saves a whole model copy.
        compact_grads: keep only the selected gradient entries and free each dense gradient during backward
            (:mod:`sparse_rl.compact_grad`): gradient memory drops from a dense gradient plus the hooks' bool mask (5
            bytes per fp32 parameter) to 8 bytes per selected entry (value and int32 index), and the optimizer step
            reads no dense gradient. Results equal the dense masked gradients'. Supported in a single process without
            fp16 loss scaling (DDP/FSDP reduce the dense gradient, the loss scaler unscales it). ``None`` (default)
            turns them on wherever supported and off elsewhere; ``True`` where unsupported is refused; ``False``
            keeps dense masked ``.grad`` tensors (e.g. to read them after backward).
        seed: seed of random discovery.
        entropy_quantile: share q of completion tokens, the highest-entropy ones, whose loss gradient is kept (the
            paper uses 0.2); ``1.0`` keeps every token. Forward values (ratios, margins, reference log-probs, the
            logged loss) are unchanged and the loss keeps the trainer's own normalisation (by all completion tokens).
            The threshold is the batch-wide ``1 - q`` quantile over all processes, identical to TRL GRPO's
            ``top_entropy_quantile``. See :mod:`sparse_rl.restrict.tokens`.
    """

    density: float = 0.1
    discovery: Literal["gradient", "random"] = "gradient"
    probe_steps: int = 4
    probe_score: Literal["gradient", "fisher", "adam", "precision"] = "gradient"
    probe_budget: Literal["per_tensor", "global"] = "per_tensor"
    mask: SubnetworkMask | str | os.PathLike | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    master_weights: bool = True
    state_bits: Literal[32, 8] = 32
    stochastic_rounding: bool = False
    shared_reference: bool = False
    compact_grads: bool | None = None
    seed: int = 0
    entropy_quantile: float = 1.0

    def __post_init__(self):
        check_density(self.density)
        if self.discovery not in ("gradient", "random"):
            raise ValueError(f"discovery must be 'gradient' or 'random', got {self.discovery!r}")
        if self.probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {self.probe_steps}")
        if self.probe_score not in PROBE_SCORES:
            raise ValueError(f"probe_score must be one of {PROBE_SCORES}, got {self.probe_score!r}")
        if self.probe_budget not in PROBE_BUDGETS:
            raise ValueError(f"probe_budget must be one of {PROBE_BUDGETS}, got {self.probe_budget!r}")
        if self.state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {self.state_bits!r}")
        if self.stochastic_rounding and self.master_weights:
            raise ValueError("stochastic_rounding replaces the fp32 master copy: set master_weights=False with it")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        check_entropy_quantile(self.entropy_quantile)


def check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
