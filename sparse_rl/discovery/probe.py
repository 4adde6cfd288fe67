"""The gradient probe: score every entry by a few batches of the user's own loss, then keep the top scores.

:class:`ProbeOptions` holds everything that shapes the probe (how many batches, what is scored, the budget rule and
the AdamW hyperparameters of the update-based scores); :class:`~sparse_rl.config.SparseConfig` embeds one, and
:func:`gradient_mask` / :func:`~sparse_rl.discovery.trainer_probe.gradient_mask_from_trainer` take one. Weights are
never changed. Under ``torch.distributed`` every process probes its own shard and each step's gradient is averaged
over the processes before it is scored, so all of them score the global batch and pick the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from ..distributed import average_gradients, check_same_parameters, is_distributed
from ..mask import SubnetworkMask
from .strategies import (
    Budget,
    check_budget,
    check_density,
    mask_from_scores,
    per_tensor_selections,
    precision_scores,
    trainable_parameters,
)

ProbeScore = Literal["gradient", "fisher", "adam", "precision"]
PROBE_SCORES = get_args(ProbeScore)
# AdamW hyperparameters of the "adam"/"precision" scores when neither the options nor a trainer give them
DEFAULT_LR, DEFAULT_BETAS, DEFAULT_EPS = 1e-6, (0.9, 0.999), 1e-8


@dataclass
class ProbeOptions:
    """How the gradient probe scores entries and turns the scores into a mask.

    Args:
        steps: batches of the real loss the probe runs (each one a forward and backward, no optimizer step).
        score: what is accumulated per entry over the ``steps`` gradients:
            ``"gradient"``: sum of |g| (one fp32 accumulator per parameter).
            ``"fisher"``: sum of g² (the diagonal empirical Fisher).
            ``"adam"``: |Σ_t m̂_t / (√v̂_t + eps)|, the net displacement ``steps`` AdamW steps would apply (in units
            of lr) if the weights stayed put. Entries whose gradient flips sign cancel out, as they do in training.
            Weight decay is left out: it moves every entry by lr·wd·|w| whatever the loss. Needs two more fp32
            copies of the model. With ``steps=1`` every entry with a non-zero gradient scores 1 (ties): use 4 or more.
            ``"precision"``: the ``"adam"`` displacement times ``lr`` over half an ulp of the weight in
            ``storage_dtype`` (:func:`~sparse_rl.discovery.strategies.half_ulp`); above 1 the update would survive
            rounding to that dtype.
        budget: ``"per_tensor"`` keeps the same density in every tensor (the research finds RL updates spread over
            nearly every matrix); ``"global"`` keeps the top scores of all entries pooled, wherever they are.
        lr: learning rate of the ``"precision"`` score (``"adam"`` is in units of lr). None: the trainer's
            ``args.learning_rate`` when probing a trainer, else 1e-6.
        betas: AdamW betas of the ``"adam"``/``"precision"`` scores. None: the trainer's ``adam_beta1/2``, else
            (0.9, 0.999).
        eps: AdamW eps of the ``"adam"``/``"precision"`` scores. None: the trainer's ``adam_epsilon``, else 1e-8.
        storage_dtype: the dtype whose resolution the ``"precision"`` score measures updates against.
        passes: how many passes over the same ``steps`` batches score the parameters, each pass a share of about
            1/passes of the entries (whole tensors in parameter order) with every other parameter's ``requires_grad``
            off, so no gradient is computed for them. One pass holds an fp32 score for every entry plus the dense
            gradients of its backward; more passes hold a share of them, for ``passes`` times the probe's forward
            and backward work. With ``budget="per_tensor"`` each pass's scores become its tensors' selections before
            the next pass starts; ``"global"`` keeps every score until the end. Given the same batches (the trainer
            probe prepares each batch once and reuses it) the mask is the one pass's. One process only.
    """

    steps: int = 4
    score: ProbeScore = "gradient"
    budget: Budget = "per_tensor"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    storage_dtype: torch.dtype = torch.bfloat16
    passes: int = 1

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or self.passes < 1:
            raise ValueError(f"passes must be a positive integer, got {self.passes!r}")
        if self.score not in PROBE_SCORES:
            raise ValueError(f"score must be one of {PROBE_SCORES}, got {self.score!r}")
        check_budget(self.budget)

    def with_adamw_defaults(self, lr: float = DEFAULT_LR, betas: tuple[float, float] = DEFAULT_BETAS,
                            eps: float = DEFAULT_EPS) -> ProbeOptions:
        """A copy whose unset ``lr``/``betas``/``eps`` take the given values."""
        return replace(self, lr=lr if self.lr is None else self.lr, betas=betas if self.betas is None else self.betas,
                       eps=eps if self.eps is None else self.eps)


def as_probe_options(options: ProbeOptions | None) -> ProbeOptions:
    """``options``, or the defaults for None; anything else is refused with the type that was given."""
    if options is None:
        return ProbeOptions()
    if not isinstance(options, ProbeOptions):
        raise TypeError(f"probe options must be a ProbeOptions (e.g. ProbeOptions(steps=4, score='adam')), got "
                        f"{type(options).__name__} {options!r}")
    return options


class _ScoreAccumulator:
    """Running score of one parameter over the probe's gradients."""

    def __init__(self, shape, device, score: str, betas: tuple[float, float], eps: float):
        self.score, self.betas, self.eps, self.step = score, betas, eps, 0
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)
        if score in ("adam", "precision"):
            self.exp_avg = torch.zeros_like(self.total)
            self.exp_avg_sq = torch.zeros_like(self.total)

    def add(self, grad: torch.Tensor) -> None:
        self.step += 1
        grad = grad.detach().float()
        if self.score == "gradient":
            self.total += grad.abs()
        elif self.score == "fisher":
            self.total += grad.square()
        else:  # the displacement AdamW would apply with the weights held fixed, in units of lr
            beta1, beta2 = self.betas
            self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (self.exp_avg_sq / (1 - beta2**self.step)).sqrt_().add_(self.eps)
            self.total += self.exp_avg / (1 - beta1**self.step) / denom

    def result(self) -> torch.Tensor:
        return (self.total.abs() if self.score in ("adam", "precision") else self.total).cpu()


def accumulate_gradient_scores(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    options: ProbeOptions | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    desc: str = "gradient probe",
) -> dict[str, torch.Tensor]:
    """Score every trainable entry (after ``include``/``exclude``) from ``options.steps`` calls of ``loss_fn(step)``
    (see :class:`ProbeOptions` for the scores); weights are not changed and gradients that existed before are
    restored afterwards. ``options.budget`` plays no part here: it applies when the scores become a mask.

    Each gradient is folded into its score during backward and then dropped, so the probe's memory is one fp32 score
    per parameter (three for ``"adam"``/``"precision"``), not score plus gradient.

    Under ``torch.distributed`` (more than one process) this is collective: every process calls it with its own
    shard's ``loss_fn``, and each step's gradient is averaged over the processes (fp32 all-reduce, as DDP averages a
    training step) before it is scored. None of the scores is linear in the gradient (|g|, g², Adam's m/√v), so
    summing per-process scores afterwards would not give the global batch's; averaging first does, and every process
    gets the same scores (bit for bit, given the same weights). The gradients are then held until the end of each
    backward, like DDP's: one gradient per parameter on top of the scores.
    """
    options = as_probe_options(options).with_adamw_defaults()
    params = trainable_parameters(model, exclude, include)
    global_batch = is_distributed()
    check_same_parameters(params)
    by_name = dict(params)
    saved_grads = {n: p.grad for n, p in params}
    accumulators = {n: _ScoreAccumulator(p.shape, p.device, options.score, options.betas, options.eps)
                    for n, p in params}
    scored: set[str] = set()

    def fold_into_score(name: str):
        # folding each gradient into its score as soon as it is complete, then dropping it, means the full set of
        # gradients never exists at once: the probe holds one fp32 score per parameter instead of score + gradient
        def hook(param: torch.Tensor) -> None:
            accumulators[name].add(param.grad)
            param.grad = None
            scored.add(name)

        return hook

    # across processes the gradients are reduced after backward, in parameter order: hooks fire in autograd's
    # order, which the processes need not share
    handles = [] if global_batch else [p.register_post_accumulate_grad_hook(fold_into_score(n)) for n, p in params]
    try:
        for step in tqdm(range(options.steps), desc=desc):
            for _, p in params:
                p.grad = None
            scored.clear()
            loss = loss_fn(step)
            loss.backward()
            if global_batch:
                for n, grad in average_gradients(params):
                    accumulators[n].add(grad.to(by_name[n].device))
                    by_name[n].grad = None
                continue
            for n, p in params:
                # outside this step's graph: torch's AdamW skips a parameter without a gradient, and so do we
                if n not in scored and p.grad is not None:
                    accumulators[n].add(p.grad)
    finally:
        for handle in handles:
            handle.remove()
        for n, p in params:
            p.grad = saved_grads[n]
    scores = {n: acc.result() for n, acc in accumulators.items()}
    if options.score == "precision":
        scores = precision_scores({n: options.lr * s for n, s in scores.items()}, by_name, options.storage_dtype)
    return scores


def gradient_mask(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    density: float,
    options: ProbeOptions | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> SubnetworkMask:
    """Keep the ``density`` share of entries with the highest probe score of the real training loss, under
    ``options.budget`` (see :func:`accumulate_gradient_scores`). Defaults: 4 batches, accumulated |gradient|, the same
    density per tensor, one pass. With ``options.passes > 1``, ``loss_fn(step)`` is called once per step in every
    pass and must give the same batch for the same ``step`` for the mask to equal one pass's."""
    check_density(density)
    options = as_probe_options(options)
    if options.passes == 1:
        scores = accumulate_gradient_scores(model, loss_fn, options, include=include, exclude=exclude)
        return mask_from_scores(scores, density, options.budget)
    if is_distributed():
        raise ValueError("ProbeOptions.passes > 1 runs in one process only: DDP/FSDP expect a gradient for every "
                         "parameter that requires one; probe with passes=1 under torch.distributed")
    groups = parameter_groups(trainable_parameters(model, exclude, include), options.passes)

    def scores_by_pass():
        for number, group in enumerate(groups, start=1):
            with only_these_require_grad(model, group):  # closed before the scores leave: the flags are back
                scores = accumulate_gradient_scores(model, loss_fn, options, include=include, exclude=exclude,
                                                    desc=f"gradient probe, pass {number}/{len(groups)}")
            yield scores

    if options.budget == "global":  # the threshold is over every score: keep them all
        return mask_from_scores({n: s for scores in scores_by_pass() for n, s in scores.items()}, density, "global")
    return SubnetworkMask(selection for scores in scores_by_pass()
                          for selection in per_tensor_selections(scores, density))


def parameter_groups(params: list[tuple[str, torch.nn.Parameter]], count: int) -> list[list[str]]:
    """``params``' names in parameter order cut into at most ``count`` runs of about equal total size (whole
    tensors: a run closes once it reaches its share of all entries)."""
    total = sum(p.numel() for _, p in params)
    groups, current, filled = [], [], 0
    for name, param in params:
        current.append(name)
        filled += param.numel()
        if len(groups) < count - 1 and filled * count >= total * (len(groups) + 1):
            groups.append(current)
            current = []
    return groups + [current] * bool(current)


class only_these_require_grad:
    """Context manager: of ``model``'s parameters that require a gradient, only those named keep requiring one
    (the others compute none in backward); the flags are restored on exit."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        self.model, self.names = model, set(names)

    def __enter__(self):
        self.switched = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in self.names]
        for param in self.switched:
            param.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for param in self.switched:
            param.requires_grad_(True)
        return False
