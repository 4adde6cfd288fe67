"""Selection rules shared by every way of choosing the subnetwork, and the baselines built on them alone.

- :func:`mask_from_scores`: the top ``density`` share of any per-entry scores, under a budget rule. Every strategy
  (probe, checkpoint diff, baselines) ends here.
- Baselines: :func:`random_mask`, :func:`magnitude_mask` (largest or smallest |w| first).
- :func:`precision_scores` / :func:`half_ulp`: an update measured against the resolution of the stored dtype.
- Name filtering: ``include``/``exclude`` are substrings of parameter names (e.g.
  ``exclude=("embed_tokens", "lm_head", "norm")``). Tied parameters (``lm_head`` sharing the input embedding) appear
  once, under the name ``named_parameters()`` gives; a pattern matching the alias applies to the parameter.

Budget rules (``budget=``): ``"per_tensor"`` (default) keeps the same density in every selected tensor, because the
research finds RL updates spread over nearly every matrix and a global top-k would let a few large-score tensors
take the whole budget; ``"global"`` keeps the top ``density`` share of all scores pooled together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from ..mask import SubnetworkMask
from .select import top_k_selections

Budget = Literal["per_tensor", "global"]
BUDGETS = get_args(Budget)


def check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")


# ---------------------------------------------------------------------------------------------- name selection
def parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``alias -> name`` for tied parameters that ``named_parameters()`` lists once (e.g. a tied ``lm_head``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


def filter_names(
    names: Iterable[str],
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    known: Iterable[str] | None = None,
) -> list[str]:
    """Names that contain one of ``include`` (all if None) and none of ``exclude``; a pattern matching the alias of
    a tied parameter applies to the parameter itself. A pattern of either kind that matches none of ``known`` (all
    the model's names, frozen ones included; default ``names``) is a typo, and an error: a mistyped ``exclude``
    would silently train what the user meant to freeze."""
    names = list(names)
    known = names if known is None else list(known)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    include = (include,) if isinstance(include, str) else (None if include is None else tuple(include))
    spellings = {n: [n] for n in names}
    for alias, name in (aliases or {}).items():
        if name in spellings:
            spellings[name].append(alias)

    def matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(pattern in spelling for spelling in spellings[name] for pattern in patterns)

    everything = known + list(aliases or {})
    for kind, patterns in (("include", include or ()), ("exclude", exclude)):
        unmatched = [p for p in patterns if not any(p in name for name in everything)]
        if unmatched:
            raise ValueError(f"{kind} pattern {unmatched[0]!r} matches no parameter; names look like {known[:4]}")
    kept = [n for n in names if (include is None or matches(n, include)) and not matches(n, exclude)]
    if not kept:
        raise ValueError(f"no parameter left after include={include} exclude={exclude}; names look like {names[:4]}")
    return kept


def trainable_parameters(
    model: torch.nn.Module, exclude: Iterable[str] = (), include: Iterable[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the parameters with ``requires_grad`` that pass :func:`filter_names`."""
    named = dict(model.named_parameters())
    params = {n: p for n, p in named.items() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True to select from")
    return [(n, params[n]) for n in filter_names(params, include, exclude, parameter_aliases(model), known=named)]


# ---------------------------------------------------------------------------------------------- budget rules
def selected_count(numel: int, density: float) -> int:
    """How many of ``numel`` entries a mask of ``density`` selects: ``ceil(density * numel)``, at least one. The one
    rounding rule every selection, and every count of what a selection will hold, goes by."""
    return min(numel, max(1, math.ceil(density * numel)))


def budget_shortfall(selections: Mapping[str, torch.Tensor], density: float) -> dict[str, int]:
    """Per tensor, how many entries a per-tensor ``density`` budget (:func:`selected_count`) needs beyond the
    ``True`` entries of ``selections`` (0 where they suffice): what a top-k over a diff at that density fills with
    entries that did not change."""
    return {name: max(0, selected_count(s.numel(), density) - int(s.sum())) for name, s in selections.items()}


def _top_k_selection(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean tensor selecting the :func:`selected_count` highest scores (ties at the threshold: lowest index
    first)."""
    return top_k_selections([scores], selected_count(scores.numel(), density))[0]


def _global_top_k_selection(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Exactly ``ceil(density * N)`` entries with the highest scores over all tensors pooled; ties at the threshold
    go to the earliest tensors and positions."""
    total = sum(s.numel() for s in scores.values())
    return dict(zip(scores, top_k_selections(list(scores.values()), selected_count(total, density))))


def mask_from_scores(
    scores: Mapping[str, torch.Tensor], density: float, budget: Budget = "per_tensor"
) -> SubnetworkMask:
    """Top-``density`` of arbitrary scores (higher is kept), per tensor or pooled (``budget="global"``)."""
    check_density(density)
    check_budget(budget)
    if not scores:
        raise ValueError("no scores given: the mask would select nothing")
    if budget == "global":
        for name, score in scores.items():
            _check_finite(name, score)
        return SubnetworkMask(_global_top_k_selection(scores, density))
    return SubnetworkMask(per_tensor_selections(scores, density))


def per_tensor_selections(scores: Mapping[str, torch.Tensor], density: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, selection)`` of each tensor's top-``density`` scores, one tensor at a time (a mask can be built from
    the pairs as they come)."""
    for name, score in scores.items():
        _check_finite(name, score)
        yield name, _top_k_selection(score, density)


def _check_finite(name: str, score: torch.Tensor) -> None:
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"scores for {name!r} contain NaN or inf; check the loss of the probe")


# ---------------------------------------------------------------------------------------------- baselines
def random_mask(
    model: torch.nn.Module,
    density: float,
    seed: int = 0,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    budget: Budget = "per_tensor",
) -> SubnetworkMask:
    """Exactly ``ceil(density * n)`` uniformly random entries of every trainable tensor (or of all of them pooled)."""
    check_density(density)
    check_budget(budget)
    generator = torch.Generator().manual_seed(seed)
    named = tqdm(trainable_parameters(model, exclude, include), desc="random mask", leave=False)
    if budget == "per_tensor":  # select as the scores are drawn: one tensor's fp32 scores (and bool selection, which
        # the mask packs to bits as it arrives) alive at a time, not all
        mask = SubnetworkMask((name, _top_k_selection(torch.rand(param.shape, generator=generator), density))
                              for name, param in named)
        if not len(mask):
            raise ValueError("no scores given: the mask would select nothing")
        return mask
    scores = {name: torch.rand(param.shape, generator=generator) for name, param in named}
    return mask_from_scores(scores, density, budget)


def magnitude_mask(
    model: torch.nn.Module,
    density: float,
    largest: bool = True,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    budget: Budget = "per_tensor",
) -> SubnetworkMask:
    """Entries with the largest (or, ``largest=False``, smallest) |w|.

    Small weights are the ones a bf16 checkpoint can show moving (their resolution is finest), so the smallest-first
    mask is the baseline a bf16 diff is most likely to resemble.
    """
    check_density(density)
    check_budget(budget)

    def score(name: str, param: torch.Tensor) -> torch.Tensor:
        magnitude = param.detach().float().abs().cpu()
        if not bool(torch.isfinite(magnitude).all()):
            raise ValueError(f"weights of {name!r} contain NaN or inf: their magnitudes cannot be ranked")
        return magnitude if largest else magnitude.neg_()

    named = tqdm(trainable_parameters(model, exclude, include), desc="magnitude mask", leave=False)
    if budget == "per_tensor":  # one tensor's scores alive at a time, as in random_mask
        mask = SubnetworkMask((name, _top_k_selection(score(name, param), density)) for name, param in named)
        if not len(mask):
            raise ValueError("no scores given: the mask would select nothing")
        return mask
    return mask_from_scores({name: score(name, param) for name, param in named}, density, budget)


# ---------------------------------------------------------------------------------------------- precision
def half_ulp(weights: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Half the spacing of ``dtype`` numbers just above each |w| (fp32 result): the smallest update that
    round-to-nearest can see. In bf16 that is between |w|·2^-9 and |w|·2^-8.

    Moving toward zero from an exact power of two the threshold is half as large; zeros get half the smallest
    subnormal spacing.
    """
    info = torch.finfo(dtype)
    stored = weights.detach().to(dtype).float()
    _, exponent = torch.frexp(stored)  # |w| = m * 2**e with m in [0.5, 1)
    spacing_floor = info.tiny * info.eps / 2
    result = torch.ldexp(torch.full_like(stored, info.eps), exponent - 2).clamp_min(spacing_floor)
    return torch.where(stored == 0, torch.full_like(stored, spacing_floor), result)


def precision_scores(
    updates: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | torch.nn.Module,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """|expected update| / :func:`half_ulp` of the weight in ``dtype``: above 1 the update survives rounding to
    ``dtype``, below 0.5 it cannot. A bf16 checkpoint diff can only show entries with a score above ~1."""
    if isinstance(weights, torch.nn.Module):
        weights = dict(weights.named_parameters())
    missing = [n for n in updates if n not in weights]
    if missing:
        raise ValueError(f"no weight for {missing[0]!r} ({len(missing)} updates without a weight)")
    return {n: u.detach().float().abs().cpu() / half_ulp(weights[n].detach().cpu(), dtype) for n, u in updates.items()}
