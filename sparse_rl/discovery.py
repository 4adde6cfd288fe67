"""Ways to choose the subnetwork. Each returns a :class:`SubnetworkMask` at a requested density.

Budget rule: the same density in every trained tensor ("per-tensor top-k"), because the research finds RL updates
spread over nearly every matrix; a global top-k would let a few large-gradient tensors take the whole budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .config import check_density
from .mask import SubnetworkMask


def _trainable(model: torch.nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, torch.nn.Parameter]]:
    exclude = tuple(exclude)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and not any(e in n for e in exclude)]


def _top_k_selection(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean tensor selecting the ``ceil(density * n)`` highest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    selection = torch.zeros(flat.numel(), dtype=torch.bool)
    if k == flat.numel():
        selection[:] = True
    else:
        selection[torch.topk(flat.float().cpu(), k, sorted=False).indices] = True
    return selection.reshape(scores.shape)


def random_mask(model: torch.nn.Module, density: float, seed: int = 0, exclude: Iterable[str] = ()) -> SubnetworkMask:
    """Exactly ``ceil(density * n)`` uniformly random entries of every trainable tensor."""
    check_density(density)
    generator = torch.Generator().manual_seed(seed)
    selections = {}
    for name, param in tqdm(_trainable(model, exclude), desc="random mask", leave=False):
        selections[name] = _top_k_selection(torch.rand(param.shape, generator=generator), density)
    return SubnetworkMask(selections)


def mask_from_scores(scores: dict[str, torch.Tensor], density: float) -> SubnetworkMask:
    """Per-tensor top-``density`` of arbitrary scores (higher is kept)."""
    check_density(density)
    return SubnetworkMask({name: _top_k_selection(score, density) for name, score in scores.items()})


def accumulate_gradient_scores(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    exclude: Iterable[str] = (),
    desc: str = "gradient probe",
) -> dict[str, torch.Tensor]:
    """Sum of |gradient| of ``loss_fn(step)`` over ``steps`` calls, per trainable parameter.

    Weights are not changed; gradients that existed before are restored afterwards.
    """
    params = _trainable(model, exclude)
    saved_grads = {n: p.grad for n, p in params}
    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params}
    try:
        for step in tqdm(range(steps), desc=desc):
            for _, p in params:
                p.grad = None
            loss = loss_fn(step)
            loss.backward()
            for n, p in params:
                if p.grad is not None:
                    scores[n] += p.grad.detach().float().abs()
    finally:
        for n, p in params:
            p.grad = saved_grads[n]
    return {n: s.cpu() for n, s in scores.items()}


def gradient_mask(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    density: float,
    steps: int = 4,
    exclude: Iterable[str] = (),
) -> SubnetworkMask:
    """Keep, in every tensor, the entries with the largest accumulated |gradient| of the real training loss."""
    check_density(density)
    return mask_from_scores(accumulate_gradient_scores(model, loss_fn, steps, exclude), density)


def trainer_loss_fn(trainer) -> Callable[[int], torch.Tensor]:
    """A ``loss_fn(step)`` running the trainer's own data pipeline and ``compute_loss`` on successive batches.

    For online trainers (GRPO, RLOO) each probe batch generates fresh completions. Internal counters and logged
    metrics touched by the probe are restored by :func:`probe_trainer_state`.
    """
    dataloader = trainer.get_train_dataloader()
    batches = iter(dataloader)

    def loss_fn(step: int) -> torch.Tensor:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dataloader)
            batch = next(batches)
        if hasattr(trainer, "_buffered_inputs"):
            trainer._buffered_inputs = None  # force generation for every probe batch
        trainer.model.train()
        inputs = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(trainer.model, inputs)

    return loss_fn


class probe_trainer_state:
    """Context manager restoring the trainer attributes that a loss probe mutates (step counters, buffered
    generations, logged metrics, RNG), so a probed run trains like an unprobed one."""

    _ATTRS = ("_step", "_buffered_inputs", "_metrics", "_textual_logs", "_total_train_tokens")

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        self.saved = {a: copy.deepcopy(getattr(self.trainer, a)) for a in self._ATTRS if hasattr(self.trainer, a)}
        self.rng = torch.random.get_rng_state()
        # set by Trainer's training loop; GRPO/RLOO's loss normalisation reads it
        self.added_accumulation = not hasattr(self.trainer, "current_gradient_accumulation_steps")
        if self.added_accumulation:
            self.trainer.current_gradient_accumulation_steps = self.trainer.args.gradient_accumulation_steps
        return self

    def __exit__(self, *exc):
        for attr, value in self.saved.items():
            setattr(self.trainer, attr, value)
        torch.random.set_rng_state(self.rng)
        if self.added_accumulation:
            del self.trainer.current_gradient_accumulation_steps
        return False


def gradient_mask_from_trainer(trainer, density: float, steps: int = 4, exclude: Iterable[str] = ()) -> SubnetworkMask:
    """Gradient-probe discovery on a TRL/transformers trainer's own loss, leaving the trainer as it was."""
    with probe_trainer_state(trainer):
        return gradient_mask(trainer.model, trainer_loss_fn(trainer), density, steps, exclude)
