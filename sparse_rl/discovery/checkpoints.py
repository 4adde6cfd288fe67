"""Checkpoint I/O for discovery and analysis: named weights of in-memory models or safetensors checkpoints, read one
tensor at a time, matched by name across checkpoints, and their differences; :func:`diff_mask` selects the entries
that changed (the paper's definition of the subnetwork).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..mask import SubnetworkMask
from .strategies import (
    Budget,
    check_budget,
    check_density,
    filter_names,
    half_ulp,
    mask_from_scores,
    parameter_aliases,
    selected_count,
)

Fill = Literal["moved", "rounded"]
FILLS = ("moved", "rounded")
_FILL_ORDER = {"moved": "those that moved most before rounding first",
               "rounded": "largest |delta| first and ties (unchanged entries) by lowest index"}
Rank = Literal["moved", "rounded"]
RANKS = ("moved", "rounded")

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
            self.aliases = parameter_aliases(source)
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

        with _reading(file):
            with safe_open(str(file), framework="pt") as f:
                return {name: file for name in f.keys()}

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self._files[name]
        if file not in self._handles:
            with _reading(file):
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
        handle = self._handle(name)
        with _reading(self._files[name]):
            return handle.get_tensor(name)

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
    return filter_names(first.names, include, exclude, aliases)


def iter_weight_pairs(
    base, finetuned, include: Iterable[str] | None = None, exclude: Iterable[str] = (), desc: str = "diff",
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, base_weight, finetuned_weight)`` tensor by tensor, as stored, for the names both share."""
    base, finetuned = as_weight_source(base), as_weight_source(finetuned)
    for name in tqdm(matched_names([base, finetuned], include, exclude), desc=desc):
        yield name, base.get(name), finetuned.get(name)


def _difference(before: torch.Tensor, after: torch.Tensor, compare_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``after - before`` in fp32 (fp64 if either side is fp64), after optionally rounding both to ``compare_dtype``."""
    if compare_dtype is not None:
        before, after = before.to(compare_dtype), after.to(compare_dtype)
    wide = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    return after.to(wide) - before.to(wide)


def iter_deltas(
    base, finetuned, include: Iterable[str] | None = None, exclude: Iterable[str] = (), desc: str = "diff",
    compare_dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, base_weight, finetuned - base)`` tensor by tensor; the difference is taken in fp32 (fp64 if
    either side is fp64) after optionally rounding both sides to ``compare_dtype`` (the base weight too)."""
    for name, before, after in iter_weight_pairs(base, finetuned, include, exclude, desc):
        delta = _difference(before, after, compare_dtype)
        yield name, before if compare_dtype is None else before.to(compare_dtype), delta


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
    fill: Fill = "moved",
    rank_changed: Rank = "moved",
) -> SubnetworkMask:
    """Entries that changed between ``base`` and ``finetuned`` (|Δ| > ``tolerance``; the paper's definition and
    default, loose enough for bf16 noise), streamed tensor by tensor.

    With ``density`` the mask instead keeps the top ``density`` share of |Δ| under ``budget``.
    ``compare_dtype=torch.bfloat16`` rounds both sides first, as the paper's code does by loading both models in
    bf16. Rounding leaves most entries of a short run unchanged (the choose-by full runs: 9.3%), so a density above
    the changed share needs a ``fill`` for the rest of the budget: ``"moved"`` takes the unchanged entries that moved
    most before rounding, in half-spacings of ``compare_dtype`` at the base weight (the ones nearest to changing);
    ``"rounded"`` ranks by the rounded |Δ| alone, so the unchanged entries tie and go by lowest index (a block, the
    same for every checkpoint: sparse_rl's behaviour before ``fill`` existed, kept so its masks reproduce). Without
    ``compare_dtype`` the two agree. ``"moved"`` needs both checkpoints stored finer than ``compare_dtype`` (save
    the finetuned weights in fp32): a tensor stored in it fills as ``"rounded"``, and the warning says so.

    A density below a tensor's changed share keeps only some changed entries, ordered by ``rank_changed``:
    ``"moved"`` by |Δ| before rounding (needs the same finer checkpoints); ``"rounded"`` by the rounded |Δ|, which in
    bf16 is mostly the spacing at the weight, so many entries tie and go by lowest index (addition's seed-0 choose-by
    full run: 66% of a 1% mask; sparse_rl's behaviour before ``rank_changed`` existed, kept so its masks reproduce).
    """
    if density is not None:
        check_density(density)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if rank_changed not in RANKS:
        raise ValueError(f"rank_changed must be one of {RANKS}, got {rank_changed!r}")
    check_budget(budget)
    by_move = compare_dtype is not None and "moved" in (fill, rank_changed)
    # changed: the maps (density None) or, for the warnings, (changed entries, entries) per tensor, not the maps
    scores, changed, stored_rounded = {}, {}, set()  # stored_rounded: names stored no finer than compare_dtype
    for name, before, after in iter_weight_pairs(base, finetuned, include, exclude, "diff mask"):
        rounded = _difference(before, after, compare_dtype).abs()
        changed_here = rounded > tolerance
        if density is None:
            changed[name] = changed_here
            continue
        changed[name] = (int(changed_here.sum()), changed_here.numel())
        if by_move and _finer(before.dtype, compare_dtype) and _finer(after.dtype, compare_dtype):
            scores[name] = _changed_first(changed_here, rounded, _difference(before, after), before, compare_dtype,
                                          tolerance, fill, rank_changed)
        else:  # no rounding, both orders asked "rounded", or the move before rounding is not in the checkpoint
            scores[name] = rounded.float()
            if by_move:
                stored_rounded.add(name)
    if density is None:
        return SubnetworkMask(changed)
    _warn_if_filled(changed, density, tolerance, budget, fill if compare_dtype is not None else "rounded",
                    stored_rounded)
    if rank_changed == "moved":
        _warn_if_ranked_by_index(changed, density, budget, stored_rounded)
    return mask_from_scores(scores, density, budget)


def _finer(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).eps < torch.finfo(than).eps


def _changed_first(changed: torch.Tensor, rounded: torch.Tensor, delta: torch.Tensor, before: torch.Tensor,
                   compare_dtype: torch.dtype, tolerance: float, fill: Fill, rank_changed: Rank) -> torch.Tensor:
    """Scores whose top-k takes the ``changed`` entries (rounded |Δ| > tolerance; scores >= 0) before the others (scores
    in [-1, 0)). Changed: largest |Δ| first, unrounded (``rank_changed="moved"``) or rounded. Others: with
    ``fill="moved"`` by how far they moved unrounded in half-spacings of ``compare_dtype`` at the base weight
    (:func:`half_ulp`; nearest to changing first), else by the rounded |Δ| (ties by lowest index)."""
    if fill == "moved":
        unchanged = -1.0 / (1.0 + delta.abs().float() / half_ulp(before, compare_dtype))
    elif tolerance > 0:  # rounded |Δ| in [0, tolerance] into [-1, -0.5], order kept
        unchanged = -1.0 / (1.0 + rounded.float() / tolerance)
    else:
        unchanged = torch.full(rounded.shape, -1.0)
    ranked = delta.abs() if rank_changed == "moved" else rounded
    return torch.where(changed, ranked.float(), unchanged)


def _totals(changed: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(changed entries, entries) over all tensors, from the per-tensor counts the warnings below take."""
    return sum(c for c, _ in changed.values()), sum(n for _, n in changed.values())


def _warn_if_filled(changed: dict[str, tuple[int, int]], density: float, tolerance: float, budget: Budget,
                    fill: Fill, stored_rounded: set[str]) -> None:
    """Say when fewer entries changed than ``density`` asks for: the top-k then takes entries within the tolerance
    (``fill``), which a user reading "the changed entries" would not expect. Short RL runs compared in bf16 do this
    (the choose-by full runs changed 9.3%). ``changed``: (changed entries, entries) per tensor; ``stored_rounded``:
    tensors whose fill had to go by lowest index."""
    total_changed, total = _totals(changed)
    if budget == "global":
        short_names = list(changed) if total_changed < selected_count(total, density) else []
    else:
        short_names = [n for n, (count, size) in changed.items() if count < selected_count(size, density)]
    if short_names:
        where = "overall" if budget == "global" else f"in {len(short_names)} of {len(changed)} tensors"
        coarse = [n for n in short_names if n in stored_rounded]
        unknown = (f"; {len(coarse)} of these tensors (e.g. {coarse[0]!r}) are stored no finer than the compare "
                   "dtype in a checkpoint, so their move before rounding is unknown and they fill by lowest index "
                   "(save the finetuned weights in fp32)") if coarse else ""
        warnings.warn(f"diff_mask: fewer than density={density:g} of the entries changed {where} (|delta| > "
                      f"tolerance={tolerance:g}; {total_changed / total:.1%} of all entries changed): the mask fills "
                      f"the rest with entries that moved by at most the tolerance, {_FILL_ORDER[fill]}{unknown}. "
                      "Pass density=None for exactly the changed entries, or a lower density.", stacklevel=3)


def _warn_if_ranked_by_index(changed: dict[str, tuple[int, int]], density: float, budget: Budget,
                             stored_rounded: set[str]) -> None:
    """Say when the density keeps only some changed entries of a tensor the checkpoint stores no finer than the
    compare dtype: they rank by the rounded |Δ|, whose ties go by lowest index, not by ``rank_changed="moved"``."""
    if budget == "global":
        total_changed, total = _totals(changed)
        cut = sorted(stored_rounded) if total_changed > selected_count(total, density) else []
    else:
        cut = [n for n in sorted(stored_rounded) if changed[n][0] > selected_count(changed[n][1], density)]
    if cut:
        warnings.warn(f"diff_mask: {len(cut)} tensors (e.g. {cut[0]!r}) changed more entries than density={density:g} "
                      "keeps but are stored no finer than the compare dtype in a checkpoint, so their move before "
                      "rounding is unknown: their changed entries rank by the rounded |delta|, ties by lowest index "
                      "(save the finetuned weights in fp32)", stacklevel=3)


@contextlib.contextmanager
def _reading(file: Path):
    """Turn safetensors' errors (which do not name the file) into a ``ValueError`` that does."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read checkpoint file {file}: {error} (is it truncated or damaged?)") from error
