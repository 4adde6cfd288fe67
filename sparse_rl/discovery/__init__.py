"""Discover the subnetwork: each way returns a :class:`~sparse_rl.mask.SubnetworkMask` at a requested density.

- :mod:`.strategies`: top-k selection of any scores under a budget rule (:func:`mask_from_scores`), the baselines
  :func:`random_mask` and :func:`magnitude_mask`, precision scores, and name filtering.
- :mod:`.probe`: the gradient probe of the user's own loss (:func:`gradient_mask`), configured by
  :class:`ProbeOptions`.
- :mod:`.trainer_probe`: the probe on a TRL/transformers trainer (:func:`gradient_mask_from_trainer`).
- :mod:`.checkpoints`: the checkpoint diff (:func:`diff_mask`, the paper's definition), streamed tensor by tensor
  from in-memory models or safetensors checkpoints (sharded ones included).
"""

from .checkpoints import FILLS, RANKS, WeightSource, as_weight_source, diff_mask, iter_deltas, matched_names
from .probe import PROBE_SCORES, ProbeOptions, accumulate_gradient_scores, gradient_mask
from .strategies import (
    BUDGETS,
    budget_shortfall,
    half_ulp,
    magnitude_mask,
    mask_from_scores,
    precision_scores,
    random_mask,
    selected_count,
)
from .trainer_probe import gradient_mask_from_trainer, probe_trainer_state, trainer_loss_fn

__all__ = [
    "BUDGETS",
    "FILLS",
    "PROBE_SCORES",
    "RANKS",
    "ProbeOptions",
    "WeightSource",
    "accumulate_gradient_scores",
    "as_weight_source",
    "budget_shortfall",
    "diff_mask",
    "gradient_mask",
    "gradient_mask_from_trainer",
    "half_ulp",
    "iter_deltas",
    "magnitude_mask",
    "mask_from_scores",
    "matched_names",
    "precision_scores",
    "probe_trainer_state",
    "random_mask",
    "selected_count",
    "trainer_loss_fn",
]
