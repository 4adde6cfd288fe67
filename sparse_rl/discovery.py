"""Ways to choose the subnetwork. Each returns a :class:`SubnetworkMask` at a requested density.

- :func:`diff_mask`: entries that changed between a base and a finetuned model (the paper's definition), streamed
  tensor by tensor from in-memory models or safetensors checkpoints (sharded ones included).
- :func:`gradient_mask` / :func:`gradient_mask_from_trainer`: a probe of the user's own loss for a few batches,
  scored by accumulated |gradient|, squared gradient (Fisher), the AdamW update the entries would receive, or that
  update relative to the resolution of the stored dtype (``"precision"``). Weights are never changed. Under
  ``torch.distributed`` every process probes its own shard and each step's gradient is averaged over the processes
  before it is scored, so all of them score the global batch and pick the same mask.
- Baselines: :func:`random_mask`, :func:`magnitude_mask` (largest or smallest |w| first).

Budget rules (``budget=``): ``"per_tensor"`` (default) keeps the same density in every selected tensor, because the
research finds RL updates spread over nearly every matrix and a global top-k would let a few large-score tensors
take the whole budget; ``"global"`` keeps the top ``density`` share of all scores pooled together.
``include``/``exclude`` are substrings of parameter names (e.g. ``exclude=("embed_tokens", "lm_head", "norm")``).
Tied parameters (``lm_head`` sharing the input embedding) appear once, under the name ``named_parameters()`` gives.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ._compat import PROBED_TRAINER_ATTRIBUTES
from .config import PROBE_BUDGETS as BUDGETS
from .config import PROBE_SCORES, check_density
from .distributed import average_gradients, check_same_parameters, is_distributed
from .mask import SubnetworkMask

Budget = Literal["per_tensor", "global"]
ProbeScore = Literal["gradient", "fisher", "adam", "precision"]


# ---------------------------------------------------------------------------------------------- name selection
def _parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``alias -> name`` for tied parameters that ``named_parameters()`` lists once (e.g. a tied ``lm_head``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


def _filter_names(
    names: Iterable[str],
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """Names that contain one of ``include`` (all if None) and none of ``exclude``; a pattern matching the alias of
    a tied parameter applies to the parameter itself."""
    names = list(names)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    include = (include,) if isinstance(include, str) else (None if include is None else tuple(include))
    spellings = {n: [n] for n in names}
    for alias, name in (aliases or {}).items():
        if name in spellings:
            spellings[name].append(alias)

    def matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(pattern in spelling for spelling in spellings[name] for pattern in patterns)

    if include is not None:
        unmatched = [p for p in include if not any(p in s for n in names for s in spellings[n])]
        if unmatched:
            raise ValueError(f"include pattern {unmatched[0]!r} matches no parameter; names look like {names[:4]}")
    kept = [n for n in names if (include is None or matches(n, include)) and not matches(n, exclude)]
    if not kept:
        raise ValueError(f"no parameter left after include={include} exclude={exclude}; names look like {names[:4]}")
    return kept


def _trainable(
    model: torch.nn.Module, exclude: Iterable[str] = (), include: Iterable[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True to select from")
    return [(n, params[n]) for n in _filter_names(params, include, exclude, _parameter_aliases(model))]


# ---------------------------------------------------------------------------------------------- budget rules
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


def _global_top_k_selection(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Exactly ``ceil(density * N)`` entries with the highest scores over all tensors pooled; ties at the threshold
    go to the earliest tensors and positions."""
    total = sum(s.numel() for s in scores.values())
    k = min(total, max(1, math.ceil(density * total)))
    if k == total:
        return {n: torch.ones(s.shape, dtype=torch.bool) for n, s in scores.items()}
    pooled = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    threshold = torch.kthvalue(pooled, total - k + 1).values  # the k-th largest score
    del pooled
    selections, remaining_ties = {}, k - sum(int((s.float() > threshold).sum()) for s in scores.values())
    for name, score in scores.items():
        score = score.float().cpu()
        selection = score > threshold
        if remaining_ties > 0:
            ties = (score == threshold).reshape(-1).nonzero().squeeze(1)[:remaining_ties]
            selection.reshape(-1)[ties] = True
            remaining_ties -= ties.numel()
        selections[name] = selection
    return selections


def mask_from_scores(
    scores: Mapping[str, torch.Tensor], density: float, budget: Budget = "per_tensor"
) -> SubnetworkMask:
    """Top-``density`` of arbitrary scores (higher is kept), per tensor or pooled (``budget="global"``)."""
    check_density(density)
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if not scores:
        raise ValueError("no scores given: the mask would select nothing")
    for name, score in scores.items():
        if not bool(torch.isfinite(score).all()):
            raise ValueError(f"scores for {name!r} contain NaN or inf; check the loss of the probe")
    if budget == "global":
        return SubnetworkMask(_global_top_k_selection(scores, density))
    return SubnetworkMask({name: _top_k_selection(score, density) for name, score in scores.items()})


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
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name, param in tqdm(_trainable(model, exclude, include), desc="random mask", leave=False):
        scores[name] = torch.rand(param.shape, generator=generator)
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
    scores = {}
    for name, param in tqdm(_trainable(model, exclude, include), desc="magnitude mask", leave=False):
        magnitude = param.detach().float().abs().cpu()
        scores[name] = magnitude if largest else -magnitude
    return mask_from_scores(scores, density, budget)


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


# ---------------------------------------------------------------------------------------------- probe of the loss
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
    steps: int,
    exclude: Iterable[str] = (),
    desc: str = "gradient probe",
    *,
    score: ProbeScore = "gradient",
    include: Iterable[str] | None = None,
    lr: float = 1e-6,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Score every trainable entry from ``steps`` calls of ``loss_fn(step)``; weights are not changed and gradients
    that existed before are restored afterwards.

    Scores:
        ``"gradient"``: sum of |g| (default; one fp32 accumulator per parameter).
        ``"fisher"``: sum of g² (the diagonal empirical Fisher).
        ``"adam"``: |Σ_t m̂_t / (√v̂_t + eps)|, the net displacement ``steps`` AdamW steps would apply (in units of
            lr) if the weights stayed put. Entries whose gradient flips sign cancel out, as they do in training.
            Weight decay is left out: it moves every entry by lr·wd·|w| whatever the loss. Needs two more fp32
            copies of the model. With ``steps=1`` every entry with a non-zero gradient scores 1 (ties): use K >= 4.

        ``"precision"``: the ``"adam"`` displacement times ``lr`` over :func:`half_ulp` of the weight in
            ``storage_dtype``; above 1 the update would survive rounding to that dtype.

    Each gradient is folded into its score during backward and then dropped, so the probe's memory is one fp32 score
    per parameter (three for ``"adam"``/``"precision"``), not score plus gradient.

    Under ``torch.distributed`` (more than one process) this is collective: every process calls it with its own
    shard's ``loss_fn``, and each step's gradient is averaged over the processes (fp32 all-reduce, as DDP averages a
    training step) before it is scored. None of the scores is linear in the gradient (|g|, g², Adam's m/√v), so
    summing per-process scores afterwards would not give the global batch's; averaging first does, and every process
    gets the same scores (bit for bit, given the same weights). The gradients are then held until the end of each
    backward, like DDP's: one gradient per parameter on top of the scores.
    """
    if score not in PROBE_SCORES:
        raise ValueError(f"score must be one of {PROBE_SCORES}, got {score!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    params = _trainable(model, exclude, include)
    global_batch = is_distributed()
    check_same_parameters(params)
    by_name = dict(params)
    saved_grads = {n: p.grad for n, p in params}
    accumulators = {n: _ScoreAccumulator(p.shape, p.device, score, betas, eps) for n, p in params}
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
        for step in tqdm(range(steps), desc=desc):
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
    if score == "precision":
        scores = precision_scores({n: lr * s for n, s in scores.items()}, dict(params), storage_dtype)
    return scores


def gradient_mask(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    density: float,
    steps: int = 4,
    exclude: Iterable[str] = (),
    *,
    score: ProbeScore = "gradient",
    budget: Budget = "per_tensor",
    include: Iterable[str] | None = None,
    lr: float = 1e-6,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> SubnetworkMask:
    """Keep the entries with the highest probe ``score`` of the real training loss (see
    :func:`accumulate_gradient_scores`). Defaults: 4 batches, accumulated |gradient|, the same density per tensor."""
    check_density(density)
    scores = accumulate_gradient_scores(model, loss_fn, steps, exclude, score=score, include=include, lr=lr,
                                        betas=betas, eps=eps, storage_dtype=storage_dtype)
    return mask_from_scores(scores, density, budget)


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

    _ATTRS = PROBED_TRAINER_ATTRIBUTES

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


def gradient_mask_from_trainer(
    trainer,
    density: float,
    steps: int = 4,
    exclude: Iterable[str] = (),
    *,
    score: ProbeScore = "gradient",
    budget: Budget = "per_tensor",
    include: Iterable[str] | None = None,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> SubnetworkMask:
    """Probe discovery on a TRL/transformers trainer's own loss, leaving the trainer as it was.

    The AdamW hyperparameters of the ``"adam"``/``"precision"`` scores (lr, betas, eps) come from ``trainer.args``.
    """
    args = trainer.args
    with probe_trainer_state(trainer):
        return gradient_mask(trainer.model, trainer_loss_fn(trainer), density, steps, exclude, score=score,
                             budget=budget, include=include, lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             storage_dtype=storage_dtype)


# ---------------------------------------------------------------------------------------------- checkpoint diff
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


class WeightSource:
    """Named floating-point weights of an in-memory model or a safetensors checkpoint, read one tensor at a time.

    ``source`` is an ``nn.Module``, a ``.safetensors`` file, or a folder with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``. Checkpoint tensors are memory-mapped with ``safe_open``, so two 135M-parameter
    checkpoints are compared without holding either in memory. A checkpoint whose ``config.json`` says
    ``tie_word_embeddings`` and that still stores ``lm_head.weight`` lists it once, under the embedding.
    """

    def __init__(self, source: torch.nn.Module | str | os.PathLike):
        self._handles: dict[str, object] = {}
        if isinstance(source, torch.nn.Module):
            self.description = type(source).__name__
            self._params = {n: p for n, p in source.named_parameters() if p.is_floating_point()}
            self.names = list(self._params)
            self.aliases = _parameter_aliases(source)
            return
        self._params = None
        path = Path(source)
        self.description = str(path)
        if path.is_dir():
            index, single = path / "model.safetensors.index.json", path / "model.safetensors"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: path / file for name, file in weight_map.items()}
            elif single.exists():
                self._files = self._single_file(single)
            else:
                found = sorted(p.name for p in path.iterdir())[:8]
                raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json "
                                        f"(found {found}); re-save the model with save_pretrained()")
            config_file = path / "config.json"
        elif path.is_file() and path.suffix == ".safetensors":
            self._files = self._single_file(path)
            config_file = path.parent / "config.json"
        else:
            raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .safetensors file")
        for file in dict.fromkeys(self._files.values()):
            if not file.exists():
                raise FileNotFoundError(f"shard {file} listed in {path} is missing")
        self.names = [n for n in self._files if self._dtype_name(n) in _SAFETENSORS_DTYPES]
        self.aliases = {}
        if config_file.exists() and json.loads(config_file.read_text()).get("tie_word_embeddings") is True:
            embeddings = [n for n in self.names if "embed_tokens" in n or n.endswith("wte.weight")]
            if embeddings and "lm_head.weight" in self.names:
                self.names.remove("lm_head.weight")
                self.aliases["lm_head.weight"] = embeddings[0]

    @staticmethod
    def _single_file(file: Path) -> dict[str, Path]:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {name: file for name in f.keys()}

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _dtype_name(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        if self._params is not None:
            return tuple(self._params[name].shape)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if self._params is not None:
            return self._params[name].dtype
        return _SAFETENSORS_DTYPES[self._dtype_name(name)]

    def get(self, name: str) -> torch.Tensor:
        """The tensor on CPU, in its stored dtype (a detached view for in-memory models: do not modify it)."""
        if self._params is not None:
            return self._params[name].detach().cpu()
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def as_weight_source(source) -> WeightSource:
    return source if isinstance(source, WeightSource) else WeightSource(source)


def matched_names(
    sources: Iterable[WeightSource], include: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> list[str]:
    """Names shared by all ``sources`` after ``include``/``exclude``, or a ``ValueError`` naming the first tensor
    missing from one of them or shaped differently (i.e. mismatched architectures)."""
    sources = list(sources)
    first = sources[0]
    for other in sources[1:]:
        for a, b in ((first, other), (other, first)):
            missing = [n for n in a.names if n not in b.names]
            if missing:
                raise ValueError(f"mismatched checkpoints: tensor {missing[0]!r} of {a.description} is missing from "
                                 f"{b.description} ({len(missing)} missing in all)")
        for name in first.names:
            if first.shape(name) != other.shape(name):
                raise ValueError(f"mismatched architectures: {name!r} has shape {first.shape(name)} in "
                                 f"{first.description} but {other.shape(name)} in {other.description}")
    aliases = {}
    for source in sources:
        aliases.update(source.aliases)
    return _filter_names(first.names, include, exclude, aliases)


def iter_deltas(
    base, finetuned, include: Iterable[str] | None = None, exclude: Iterable[str] = (), desc: str = "diff",
    compare_dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, base_weight, finetuned - base)`` tensor by tensor; the difference is taken in fp32 (fp64 if
    either side is fp64) after optionally rounding both sides to ``compare_dtype``."""
    base, finetuned = as_weight_source(base), as_weight_source(finetuned)
    for name in tqdm(matched_names([base, finetuned], include, exclude), desc=desc):
        before, after = base.get(name), finetuned.get(name)
        if compare_dtype is not None:
            before, after = before.to(compare_dtype), after.to(compare_dtype)
        wide = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
        yield name, before, after.to(wide) - before.to(wide)


def diff_mask(
    base: torch.nn.Module | str | os.PathLike,
    finetuned: torch.nn.Module | str | os.PathLike,
    density: float | None = None,
    tolerance: float = 1e-5,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    budget: Budget = "per_tensor",
    compare_dtype: torch.dtype | None = None,
) -> SubnetworkMask:
    """Entries that changed between ``base`` and ``finetuned`` (|Δ| > ``tolerance``; the paper's definition and
    default, loose enough for bf16 noise), streamed tensor by tensor.

    With ``density`` the mask instead keeps the top ``density`` share of |Δ| under ``budget`` (if fewer entries
    changed, unchanged ones fill the budget). ``compare_dtype=torch.bfloat16`` rounds both sides first, as the
    paper's code does by loading both models in bf16.
    """
    if density is not None:
        check_density(density)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    scores = {}
    for name, _, delta in iter_deltas(base, finetuned, include, exclude, "diff mask", compare_dtype):
        scores[name] = delta.abs() > tolerance if density is None else delta.abs().float()
    if density is None:
        return SubnetworkMask(scores)
    return mask_from_scores(scores, density, budget)
