"""``SparseConfig``: everything that decides how a trainer is made sparse, in one dataclass (PEFT/TRL style)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .discovery.probe import ProbeOptions
from .discovery.strategies import check_density
from .mask import SubnetworkMask
from .restrict.tokens import check_entropy_quantile

# (density, best learning rate of the mask / full finetuning's best, 3e-6) at each density the README's "Choose by"
# sweeps measured (see SparseConfig.suggested_learning_rate), rounded to the sweeps' 1-3-10 grid; at density 1 every
# mask is full finetuning
MEASURED_LR_FACTORS = {
    "gradient": ((0.01, 10.0), (0.05, 10.0), (0.1, 3.0), (1.0, 1.0)),  # best lr 3e-5, 3e-5, 1e-5 (30% not swept)
    "random": ((0.01, 300.0), (0.1, 30.0), (0.3, 3.0), (1.0, 1.0)),  # best lr 1e-3, 1e-4, 1e-5 (5% not swept)
}


def learning_rate_factor(discovery: str, density: float) -> float:
    """How many times full finetuning's learning rate a discovered mask of ``density`` wants: the measured factor
    at a measured density (at density 1, full finetuning: 1), interpolated in log-log between two (a power law
    between neighbours), and held below the lowest."""
    densities, factors = zip(*MEASURED_LR_FACTORS[discovery])
    return float(np.exp(np.interp(np.log(density), np.log(densities), np.log(factors))))


@dataclass
class SparseConfig:
    """How to choose and train the subnetwork.

    Args:
        density: share of the entries of each trained matrix that is selected, in (0, 1]. The research finds RL
            updates 5-30% of parameters. The default 0.05 is what the README's "Choose by" table supports (GRPO on
            SmolLM2-135M, the gradient probe): at 0.05 and its own lr (10x full finetuning's, see
            :meth:`suggested_learning_rate`) it recovered 1.08 [1.01, 1.18] of full finetuning's held-out gain on one
            task (3 seeds as steady as 0.1's) and was level with 0.1 on both tasks, for about half the optimizer state
            (69 against 120 MiB; LoRA at 0.1's count: 103 MiB). At 0.01 and its own lr it was level with 0.1 too
            (1.03 [0.89, 1.18] and 0.96 [0.89, 1.03]) but its seeds spread 4x wider; at 0.3 it gained nothing over 0.1.
            Below 0.1 the same lr as 0.1 recovered resolvably less: raise it (:meth:`suggested_learning_rate`).
            Trained twice as long on the second task (120 steps, where full finetuning plateaus) it stayed level with
            full finetuning and LoRA (0.93 [0.82, 1.07] of the gain; no row resolvably ahead).
        discovery: how to pick the entries when no ``mask`` is given. ``"gradient"`` runs a probe of the trainer's
            own loss (``probe``; by default 4 batches, keeping the entries with the largest accumulated |gradient|
            in every matrix); ``"random"`` draws a uniform random subset (a strong baseline: at 10% the probe did
            not resolvably beat it in our runs, +0.049 [-0.019, 0.113] of reward over 5 seeds each, but the probe's
            seeds spread 7x less (SD 0.010 against 0.074); at 5% +0.033 [-0.003, 0.071], not resolved either; at 1%,
            each at its own lr, +0.018 [-0.114, 0.137] over 3 seeds, random's spreading 2x wider). The two want
            different learning rates (the trainer's ``learning_rate`` is used as given): in our sweeps the probe's
            10% mask was best at ~3x full finetuning's lr, its 5% and 1% masks at ~10x and the random mask at ~30x
            (at 1% ~300x, at 30% ~3x); an unfair lr decides more than the mask does (:meth:`suggested_learning_rate`
            gives these).
        probe: how ``"gradient"`` discovery probes: batches, score (``"gradient"`` |g|, ``"fisher"`` g², ``"adam"``
            the size of the AdamW update the entry would get, ``"precision"`` that update relative to half a bf16
            ulp of the weight), budget rule (``"per_tensor"`` or ``"global"``), passes (more passes over the same
            batches hold fewer scores and gradients at once: a lower peak for more compute). A
            :class:`~sparse_rl.discovery.ProbeOptions` (or a dict of its fields); its unset AdamW hyperparameters
            come from the trainer's arguments.
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
            (:class:`sparse_rl.reference.SharedReference`); saves a whole model copy. ``sparsify`` frees the copy
            TRL built; :func:`sparse_rl.trl.build_trainer` builds the trainer without ever loading it.
        compact_grads: keep only the selected gradient entries and free each dense gradient during backward
            (:mod:`sparse_rl.restrict.compact`): gradient memory drops from a dense gradient plus the hooks' bool mask
            (5 bytes per fp32 parameter) to 8 bytes per selected entry (value and int32 index), and the optimizer step
            reads no dense gradient. Results equal the dense masked gradients'. Supported in a single process without
            fp16 loss scaling (DDP/FSDP reduce the dense gradient, the loss scaler unscales it). ``None`` (default)
            turns them on wherever supported and off elsewhere; ``True`` where unsupported is refused; ``False``
            keeps dense masked ``.grad`` tensors (e.g. to read them after backward).
        seed: seed of random discovery.
        entropy_quantile: share q of completion tokens, the highest-entropy ones, whose loss gradient is kept (the
            paper uses 0.2); ``1.0`` keeps every token. Forward values (ratios, margins, reference log-probs, the
            logged loss) are unchanged and the loss keeps the trainer's own normalisation (by all completion tokens).
            The threshold is the batch-wide ``1 - q`` quantile over all processes, identical to TRL GRPO's
            ``top_entropy_quantile``. See :mod:`sparse_rl.restrict.tokens`. In the README's "Choose by" runs (GRPO,
            4-token completions) q=0.2 lowered full finetuning's held-out gain (0.77 [0.66, 0.89] of it, at the
            all-token lr): the default keeps every token.
        skip_nonfinite_steps: skip an optimizer step whose gradients hold a NaN or an infinity, leaving weights and
            optimizer state as they were (logged as ``sparse/skipped_steps``), as ``torch.amp.GradScaler`` does.
            Without it one NaN in a selected gradient entry turns every selected entry into NaN at that step
            (Trainer's gradient clipping multiplies all gradients by the NaN norm); unselected entries stay intact.
    """

    density: float = 0.05
    discovery: Literal["gradient", "random"] = "gradient"
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    mask: SubnetworkMask | str | os.PathLike | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    master_weights: bool = True
    state_bits: Literal[32, 8] = 32
    stochastic_rounding: bool = False
    shared_reference: bool = False
    compact_grads: bool | None = None
    seed: int = 0
    entropy_quantile: float = 1.0
    skip_nonfinite_steps: bool = False

    def suggested_learning_rate(self, full_finetuning_lr: float) -> float:
        """The learning rate to train this subnetwork with, given the one you would use for full finetuning.

        sparse_rl trains at the trainer's ``learning_rate`` as given; a mask wants a larger one than full
        finetuning, and how much larger depends on the mask and its density. The factors are the best learning rates
        of the README's "Choose by" sweeps (GRPO on SmolLM2-135M, seed 0 per lr, 3 seeds at the best; full
        finetuning's best was 3e-6) divided by full finetuning's: the gradient probe at 10% 3x, at 5% and 1% 10x (at
        3x they recovered resolvably less), a random mask 300x at 1%, 30x at 10% and 3x at 30% (its best lr fell
        10x from 1% to 10% and again from 10% to 30%). At density 1 every mask is full finetuning (1x). Between
        these densities the factor is interpolated in log-log (not measured there: the probe at 7% gets ~5.6x, at
        30% ~1.8x, where its mask at 3x recovered 1.06 of the gain; random at 5% ~60x), and below 1% it is held at
        1%'s. The grid steps by ~3x, so each factor is known to about that step; a short sweep of your own around
        the suggestion decides on another model or task. The
        probe's factors were measured with its default ``score="gradient"``; the Fisher score's 10% sweep tied 1e-5
        and 3e-5 (3x and 10x) and its 1% mask trained well at 10x; the ``"adam"``/``"precision"`` scores were not
        swept. No factor was measured for a given ``mask`` (post-hoc diff masks were best at ~10x, smallest-|w|
        masks at ~30x in our runs), so asking for one is an error.
        """
        if not (isinstance(full_finetuning_lr, (int, float)) and math.isfinite(full_finetuning_lr)
                and full_finetuning_lr > 0):
            raise ValueError(f"full_finetuning_lr must be a positive finite number, got {full_finetuning_lr!r}")
        if self.mask is not None:
            raise ValueError("suggested_learning_rate has no measured rule for a given mask (post-hoc diff masks were "
                             "best at ~10x full finetuning's lr, smallest-|w| masks at ~30x in the README's runs): "
                             "choose its learning rate by a short sweep")
        return full_finetuning_lr * learning_rate_factor(self.discovery, self.density)

    def __post_init__(self):
        check_density(self.density)
        if self.discovery not in ("gradient", "random"):
            raise ValueError(f"discovery must be 'gradient' or 'random', got {self.discovery!r}")
        if isinstance(self.probe, dict):
            self.probe = ProbeOptions(**self.probe)
        if not isinstance(self.probe, ProbeOptions):
            raise TypeError(f"probe must be a ProbeOptions or a dict of its fields, got {type(self.probe).__name__}")
        if self.state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {self.state_bits!r}")
        if self.stochastic_rounding and self.master_weights:
            raise ValueError("stochastic_rounding replaces the fp32 master copy: set master_weights=False with it")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        check_entropy_quantile(self.entropy_quantile)
