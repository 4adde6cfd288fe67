"""Check the research claims on your own checkpoints: how sparse and how low-rank an RL update is, how much two runs'
updates overlap, and how much of that is bf16 rounding rather than the optimiser's choice.

    report = analyze_update("base_folder", "finetuned_folder")      # streamed tensor by tensor
    print(report.table()); report.write_csv("update.csv"); report.plot("update.png")
    control = precision_control("base_folder", "finetuned_folder", other="finetuned_seed2")
    print(control.summary())

Definitions follow the paper's code (SagnikMukherjee/sparsity_in_rl): an entry is unchanged when |Δ| <= tolerance
(default 1e-5); update sparsity is the unchanged share; the rank of a matrix update is ``torch.linalg.matrix_rank``
of Δ in fp32 (singular values above σ_max · max(m, n) · 2^-23 count), reported as rank/min(m, n) and averaged over
the 2-D matrices; overlap of two runs is |I1 ∩ I2| / |I1| against chance.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .discovery import as_weight_source, iter_deltas, matched_names
from .mask import MODULE_TYPES, SubnetworkMask, module_type

_LAYER = re.compile(r"\.(\d+)\.")
_FP32_RANK_RTOL = "max(m, n) * 2^-23"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to (the first ``.<int>.`` in its name), else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def matrix_kind(name: str) -> str:
    """Short label of a parameter inside its block, e.g. ``q_proj`` or ``q_proj.bias``."""
    match = _LAYER.search(name)
    rest = name[match.end():] if match else name
    parts = rest.split(".")
    if parts[-1] == "weight" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts[-2:]) if parts[-1] == "bias" else parts[-1]


def update_rank(delta: torch.Tensor, rtol: float | None = None) -> int:
    """Rank of a 2-D update: singular values of Δ (fp32) above ``rtol`` · σ_max count; the default rtol is
    max(m, n) · eps(fp32), i.e. ``torch.linalg.matrix_rank``'s default and the paper's."""
    if delta.dim() != 2:
        raise ValueError(f"update_rank needs a 2-D matrix, got shape {tuple(delta.shape)}")
    # One thread: LAPACK's threaded SVD of these small matrices is no faster, and when the cores are shared with
    # other processes it slows down ~15x (measured on 2 cores: 1.2 s vs 0.07 s for a 576x576 matrix).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return int(torch.linalg.matrix_rank(delta.float(), rtol=rtol))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- update report
@dataclass
class TensorUpdate:
    """Update statistics of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    changed: int
    rank: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        """Share of entries left unchanged (|Δ| <= tolerance)."""
        return 1.0 - self.changed / self.numel if self.numel else 1.0

    @property
    def full_rank(self) -> int | None:
        return min(self.shape) if len(self.shape) == 2 else None

    @property
    def rank_ratio(self) -> float | None:
        return None if self.rank is None or not self.full_rank else self.rank / self.full_rank

    @property
    def module_type(self) -> str:
        return module_type(self.name)

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def kind(self) -> str:
        return matrix_kind(self.name)


@dataclass
class UpdateReport:
    """Per-tensor update sparsity and rank of ``finetuned`` against ``base``."""

    base: str
    finetuned: str
    tolerance: float
    rank_rtol: float | None
    compare_dtype: str | None
    tensors: list[TensorUpdate]
    mask: SubnetworkMask | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)

    @property
    def sparsity(self) -> float:
        """Unchanged share of all compared entries (the paper's "update sparsity")."""
        return 1.0 - self.changed / self.total if self.total else 1.0

    @property
    def ranked(self) -> list[TensorUpdate]:
        return [t for t in self.tensors if t.rank_ratio is not None]

    @property
    def mean_rank_ratio(self) -> float | None:
        """Mean of rank(Δ)/min(m, n) over the 2-D matrices (the paper's summary)."""
        ranked = self.ranked
        return sum(t.rank_ratio for t in ranked) / len(ranked) if ranked else None

    @property
    def rank_tolerance(self) -> str:
        rtol = _FP32_RANK_RTOL if self.rank_rtol is None else f"{self.rank_rtol:g}"
        return f"singular values of fp32 Δ above σ_max · {rtol} count"

    def sparsity_by_module_type(self) -> dict[str, float]:
        total: dict[str, int] = {}
        changed: dict[str, int] = {}
        for t in self.tensors:
            total[t.module_type] = total.get(t.module_type, 0) + t.numel
            changed[t.module_type] = changed.get(t.module_type, 0) + t.changed
        return {k: 1.0 - changed[k] / total[k] for k in MODULE_TYPES if total.get(k)}

    def layers(self) -> dict[int, dict[str, TensorUpdate]]:
        """``{layer: {kind: TensorUpdate}}`` for the tensors inside numbered blocks."""
        layers: dict[int, dict[str, TensorUpdate]] = {}
        for t in self.tensors:
            if t.layer is not None:
                layers.setdefault(t.layer, {})[t.kind] = t
        return dict(sorted(layers.items()))

    # ------------------------------------------------------------------ outputs
    def rows(self) -> list[dict]:
        return [
            {"name": t.name, "module_type": t.module_type, "layer": "" if t.layer is None else t.layer,
             "kind": t.kind, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype, "numel": t.numel,
             "changed": t.changed, "sparsity": t.sparsity,
             "rank": "" if t.rank is None else t.rank, "full_rank": "" if t.full_rank is None else t.full_rank,
             "rank_ratio": "" if t.rank_ratio is None else t.rank_ratio}
            for t in self.tensors
        ]

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def summary(self) -> str:
        lines = [
            f"base:      {self.base}",
            f"finetuned: {self.finetuned}",
            f"entries changed (|Δ| > {self.tolerance:g}"
            + (f", both sides rounded to {self.compare_dtype}" if self.compare_dtype else "")
            + f"): {self.changed:,} of {self.total:,} = {1 - self.sparsity:.4%}; update sparsity {self.sparsity:.4%}",
        ]
        by_type = self.sparsity_by_module_type()
        lines.append("update sparsity by module type: "
                     + ", ".join(f"{k} {v:.2%}" for k, v in by_type.items()))
        touched = sum(1 for t in self.tensors if t.changed)
        lines.append(f"tensors with at least one changed entry: {touched} of {len(self.tensors)}")
        if self.mean_rank_ratio is not None:
            lines.append(f"update rank: mean rank(Δ)/min(m, n) over {len(self.ranked)} matrices = "
                         f"{self.mean_rank_ratio:.2%} ({self.rank_tolerance})")
        return "\n".join(lines)

    def table(self) -> str:
        """Per-layer tables of update sparsity (and rank) by matrix kind, then the tensors outside the blocks."""
        layers = self.layers()
        out = []
        sections = [("update sparsity, % of entries unchanged", lambda t: 100 * t.sparsity)]
        if self.ranked:
            sections.append(("update rank, % of full rank", lambda t: None if t.rank_ratio is None
                             else 100 * t.rank_ratio))
        for title, value in sections:
            if not layers:
                break
            kinds = [k for k in _ordered_kinds(layers) if any(k in row and value(row[k]) is not None
                                                               for row in layers.values())]
            widths = [max(8, len(k) + 2) for k in kinds]
            out.append(title)
            out.append("layer".ljust(6) + "".join(k.rjust(w) for k, w in zip(kinds, widths)))
            for index, row in layers.items():
                cells = []
                for kind, width in zip(kinds, widths):
                    v = value(row[kind]) if kind in row else None
                    cells.append(("-" if v is None else f"{v:.2f}").rjust(width))
                out.append(str(index).ljust(6) + "".join(cells))
            out.append("")
        others = [t for t in self.tensors if t.layer is None]
        if others:
            width = max(len(t.name) for t in others) + 2
            out.append("tensors outside the blocks".ljust(width) + "sparsity %".rjust(12) + "rank %".rjust(10))
            for t in others:
                rank = "-" if t.rank_ratio is None else f"{100 * t.rank_ratio:.2f}"
                out.append(t.name.ljust(width) + f"{100 * t.sparsity:.2f}".rjust(12) + rank.rjust(10))
            out.append("")
        out.append(self.summary())
        return "\n".join(out)

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG of update sparsity (and rank) per layer, one line per matrix kind."""
        plt = _pyplot()
        layers = self.layers()
        if not layers:
            raise ValueError("no tensor inside numbered blocks (names like 'model.layers.3.mlp...'): nothing to plot "
                             "per layer")
        kinds = _ordered_kinds(layers)
        panels = [("update sparsity (%)", lambda t: 100 * t.sparsity)]
        if self.ranked:
            panels.append(("rank(Δ) / min(m, n) (%)", lambda t: None if t.rank_ratio is None else 100 * t.rank_ratio))
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
        for ax, (label, value) in zip(axes[0], panels):
            for kind in kinds:
                points = [(i, value(row[kind])) for i, row in layers.items() if kind in row]
                points = [(i, v) for i, v in points if v is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=kind)
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].axhline(100 * self.sparsity, color="black", linestyle="--", linewidth=1, label="overall")
        axes[0][0].set_title(f"update sparsity per layer (changed: |Δ| > {self.tolerance:g})")
        if len(panels) > 1:
            axes[0][1].set_title("update rank per layer")
        axes[0][0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=5, frameon=False)
        for ax in axes[0]:
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path


_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ordered_kinds(layers: dict[int, dict[str, TensorUpdate]]) -> list[str]:
    """Matrix kinds in reading order (attention, MLP, then the rest as they appear), whatever the file order."""
    kinds = list(dict.fromkeys(k for row in layers.values() for k in row))
    known = [k for k in _KIND_ORDER if k in kinds]
    rest = sorted((k for k in kinds if k not in known),
                  key=lambda k: (MODULE_TYPES.index(module_type(k)), kinds.index(k)))
    return known + rest


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'sparse-rl[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analyze_update(
    base: torch.nn.Module | str | os.PathLike,
    finetuned: torch.nn.Module | str | os.PathLike,
    tolerance: float = 1e-5,
    *,
    rank: bool = True,
    rank_rtol: float | None = None,
    compare_dtype: torch.dtype | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    keep_mask: bool = False,
) -> UpdateReport:
    """Update sparsity of every tensor and the rank of every 2-D update, streamed tensor by tensor.

    ``compare_dtype=torch.bfloat16`` rounds both sides first (the paper's code loads both models in bf16).
    ``keep_mask=True`` keeps the changed entries as ``report.mask`` (one bool per parameter).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    base_source, finetuned_source = as_weight_source(base), as_weight_source(finetuned)
    tensors, selections = [], {}
    for name, _, delta in iter_deltas(base_source, finetuned_source, include, exclude, "analyze update",
                                      compare_dtype):
        changed = delta.abs() > tolerance
        stored, base_stored = finetuned_source.dtype(name), base_source.dtype(name)
        dtype = _dtype_name(stored) + ("" if base_stored == stored else f" vs {_dtype_name(base_stored)}")
        tensors.append(TensorUpdate(
            name=name, shape=tuple(delta.shape), changed=int(changed.sum()), dtype=dtype,
            rank=update_rank(delta, rank_rtol) if rank and delta.dim() == 2 else None,
        ))
        if keep_mask:
            selections[name] = changed
    return UpdateReport(
        base=base_source.description, finetuned=finetuned_source.description, tolerance=tolerance,
        rank_rtol=rank_rtol, compare_dtype=None if compare_dtype is None else _dtype_name(compare_dtype),
        tensors=tensors, mask=SubnetworkMask(selections) if keep_mask else None,
    )


# ---------------------------------------------------------------------------------------------- overlap
@dataclass
class MaskOverlap:
    """Overlap of two masks against two independent uniformly random masks with the same number of selected
    entries in every tensor.

    With k1_t, k2_t selected out of n_t entries of tensor t, the random masks share in expectation
    E∩ = Σ_t k1_t · k2_t / n_t entries, so
        chance_overlap = E∩ / Σ k1_t                (equals the density of mask 2 when it is uniform over tensors,
                                                     the chance level the paper uses for |I1 ∩ I2| / |I1|)
        chance_jaccard = E∩ / (Σ k1_t + Σ k2_t − E∩)
    """

    intersection: int
    selected1: int
    selected2: int
    total: int
    expected_intersection: float

    @property
    def union(self) -> int:
        return self.selected1 + self.selected2 - self.intersection

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else 0.0

    @property
    def chance_jaccard(self) -> float:
        denominator = self.selected1 + self.selected2 - self.expected_intersection
        return self.expected_intersection / denominator if denominator else 0.0

    @property
    def overlap(self) -> float:
        """|I1 ∩ I2| / |I1| (the paper's overlap)."""
        return self.intersection / self.selected1 if self.selected1 else 0.0

    @property
    def chance_overlap(self) -> float:
        return self.expected_intersection / self.selected1 if self.selected1 else 0.0

    @property
    def overlap_over_chance(self) -> float:
        return self.overlap / self.chance_overlap if self.chance_overlap else float("nan")

    @property
    def density2(self) -> float:
        return self.selected2 / self.total if self.total else 0.0

    def summary(self) -> str:
        return (f"overlap |I1 ∩ I2| / |I1| = {self.overlap:.4f} (chance {self.chance_overlap:.4f}, "
                f"{self.overlap_over_chance:.2f}x); Jaccard {self.jaccard:.4f} (chance {self.chance_jaccard:.4f})")


def _overlap_counts(selected1: torch.Tensor, selected2: torch.Tensor) -> tuple[int, int, int, int, float]:
    k1, k2, n = int(selected1.sum()), int(selected2.sum()), selected1.numel()
    return int((selected1 & selected2).sum()), k1, k2, n, (k1 * k2 / n if n else 0.0)


def _sum_overlaps(counts: Iterable[tuple[int, int, int, int, float]]) -> MaskOverlap:
    inter = k1 = k2 = n = 0
    expected = 0.0
    for i, a, b, size, e in counts:
        inter, k1, k2, n, expected = inter + i, k1 + a, k2 + b, n + size, expected + e
    return MaskOverlap(intersection=inter, selected1=k1, selected2=k2, total=n, expected_intersection=expected)


def mask_overlap(mask1: SubnetworkMask, mask2: SubnetworkMask) -> MaskOverlap:
    """Jaccard and |I1 ∩ I2| / |I1| of two masks, each against chance (see :class:`MaskOverlap`). A tensor absent
    from one mask counts as unselected there."""
    counts = []
    for name in dict.fromkeys(list(mask1) + list(mask2)):
        a = mask1.selections.get(name)
        b = mask2.selections.get(name)
        if a is not None and b is not None and a.shape != b.shape:
            raise ValueError(f"masks disagree on the shape of {name!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        counts.append(_overlap_counts(a, b))
    return _sum_overlaps(counts)


# ---------------------------------------------------------------------------------------------- precision control
@dataclass
class PrecisionControl:
    """How much of an update's sparsity (and of two runs' overlap) rounding to ``dtype`` explains.

    ``changed_exact``: entries whose value differs at all in the wider stored dtype (only when both checkpoints are
    stored wider than ``dtype``, e.g. fp32 vs bf16), i.e. what the optimiser moved.
    ``changed_rounded``: entries that differ by more than ``tolerance`` after rounding both sides to ``dtype``, i.e.
    what a ``dtype`` checkpoint diff shows.
    ``changed_null``: the same for the null model, where every tensor's update values (the fp32 difference when
    available, else the stored difference) are moved to random entries of the same tensor before rounding to
    ``dtype``. If the null's sparsity matches the measured one, which entries change is set by the weights'
    magnitudes through rounding, not by where the optimiser put its update. With bf16-only checkpoints the values
    of the unchanged entries are unknown (zeros), so the null can only show whether rounding removes more.
    ``overlap*`` (with a second run ``other`` from the same base): |I1 ∩ I2| / |I1| of the rounded diffs, of two
    independently shuffled null diffs, and for two independent uniformly random masks of the measured densities.
    """

    dtype: str
    tolerance: float
    values: str
    total: int
    changed_rounded: int
    changed_null: int
    changed_exact: int | None = None
    overlap: MaskOverlap | None = None
    null_overlap: MaskOverlap | None = None
    null_mean_rank_ratio: float | None = None

    @property
    def sparsity_exact(self) -> float | None:
        return None if self.changed_exact is None else 1.0 - self.changed_exact / self.total

    @property
    def sparsity_rounded(self) -> float:
        return 1.0 - self.changed_rounded / self.total

    @property
    def sparsity_null(self) -> float:
        return 1.0 - self.changed_null / self.total

    @property
    def null_sparsity_share(self) -> float:
        """Null sparsity over measured sparsity (1 = the null reproduces all of it)."""
        return self.sparsity_null / self.sparsity_rounded if self.sparsity_rounded else float("nan")

    @property
    def rounding_sparsity_share(self) -> float | None:
        """Share of the measured sparsity made of entries the optimiser did move but rounding hid (needs the
        wider weights): (sparsity_rounded − sparsity_exact) / sparsity_rounded."""
        if self.sparsity_exact is None or not self.sparsity_rounded:
            return None
        return (self.sparsity_rounded - self.sparsity_exact) / self.sparsity_rounded

    @property
    def null_overlap_share(self) -> float | None:
        """Null overlap over measured overlap (1 = rounding of the shared base weights explains all of it)."""
        if self.overlap is None or self.null_overlap is None or not self.overlap.overlap:
            return None
        return self.null_overlap.overlap / self.overlap.overlap

    @property
    def null_excess_overlap_share(self) -> float | None:
        """The same for the excess over chance: (null − chance) / (measured − chance)."""
        if self.overlap is None or self.null_overlap is None:
            return None
        excess = self.overlap.overlap - self.overlap.chance_overlap
        return (self.null_overlap.overlap - self.overlap.chance_overlap) / excess if excess else None

    def summary(self) -> str:
        lines = [f"precision control (null model: the same {self.values} values moved to random entries of each "
                 f"tensor, then rounded to {self.dtype}; unchanged = |Δ| <= {self.tolerance:g})"]
        rows = []
        if self.changed_exact is not None:
            rows.append(("exact diff (as stored, any change)", self.sparsity_exact, ""))
        rows.append((f"{self.dtype} diff", self.sparsity_rounded, ""))
        rows.append(("null model", self.sparsity_null,
                     f" -> reproduces {self.null_sparsity_share:.1%} of the measured sparsity"))
        width = max(len(label) for label, _, _ in rows) + 2
        for label, sparsity, note in rows:
            lines.append(f"  {(label + ':').ljust(width)} update sparsity {sparsity:.4%}{note}")
        if self.changed_exact is None:
            lines.append("  exact diff: not available (the checkpoints are not stored wider than "
                         f"{self.dtype}; save fp32 weights to separate the optimiser's sparsity from rounding)")
        if self.rounding_sparsity_share is not None:
            lines.append(f"  entries the optimiser moved but {self.dtype} rounding hid: "
                         f"{self.rounding_sparsity_share:.1%} of the measured sparsity")
        if self.overlap is not None and self.null_overlap is not None:
            lines.append(f"  seed overlap |I1 ∩ I2| / |I1|: measured {self.overlap.overlap:.4f}, null "
                         f"{self.null_overlap.overlap:.4f}, chance {self.overlap.chance_overlap:.4f}")
            if self.null_overlap_share is not None:
                excess = self.null_excess_overlap_share
                lines.append(f"  null reproduces {self.null_overlap_share:.1%} of the overlap"
                             + ("" if excess is None else f" and {excess:.1%} of its excess over chance"))
        if self.null_mean_rank_ratio is not None:
            lines.append(f"  null model update rank: mean rank(Δ)/min(m, n) = {self.null_mean_rank_ratio:.2%}")
        return "\n".join(lines)


def precision_control(
    base: torch.nn.Module | str | os.PathLike,
    finetuned: torch.nn.Module | str | os.PathLike,
    other: torch.nn.Module | str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    tolerance: float = 1e-5,
    *,
    seed: int = 0,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    rank: bool = False,
) -> PrecisionControl:
    """Compare the measured update with a null model that keeps each tensor's update values but places them at
    random entries before rounding to ``dtype`` (see :class:`PrecisionControl`). ``other`` is a second finetuned run
    from the same base (another seed) for the overlap control. ``rank=True`` also measures the mean
    rank(Δ)/min(m, n) of the null model's rounded 2-D updates (compare with ``analyze_update(...,
    compare_dtype=dtype).mean_rank_ratio``): a scattered update is full rank whoever placed it."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    sources = [as_weight_source(s) for s in (base, finetuned) + (() if other is None else (other,))]
    names = matched_names(sources, include, exclude)
    generator = torch.Generator().manual_seed(seed)
    resolution = torch.finfo(dtype).eps
    total = changed_rounded = changed_null = changed_exact = 0
    exact_available = True
    overlaps, null_overlaps, null_ranks = [], [], []
    for name in tqdm(names, desc="precision control"):
        weights = [s.get(name) for s in sources]
        exact_available &= all(torch.finfo(w.dtype).eps < resolution for w in weights)
        wide = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        before = weights[0].to(wide)
        before_rounded = before.to(dtype).to(wide)
        rounded_changes, null_changes = [], []
        for after in weights[1:]:
            after = after.to(wide)
            values = (after - before).reshape(-1)
            rounded_changes.append((after.to(dtype).to(wide) - before_rounded).abs() > tolerance)
            shuffled = values[torch.randperm(values.numel(), generator=generator)].view(before.shape)
            null_changes.append(((before + shuffled).to(dtype).to(wide) - before_rounded).abs() > tolerance)
            if len(rounded_changes) == 1:
                changed_exact += int((values != 0).sum())
                if rank and before.dim() == 2:
                    null_delta = (before + shuffled).to(dtype).to(wide) - before_rounded
                    null_ranks.append(update_rank(null_delta, None) / min(before.shape))
        total += before.numel()
        changed_rounded += int(rounded_changes[0].sum())
        changed_null += int(null_changes[0].sum())
        if other is not None:
            overlaps.append(_overlap_counts(*rounded_changes))
            null_overlaps.append(_overlap_counts(*null_changes))
    first, second = sources[0].dtype(names[0]), sources[1].dtype(names[0])
    values = f"{_dtype_name(second)} difference" if exact_available else f"stored {_dtype_name(second)} difference"
    if first != second:
        values += f", base stored as {_dtype_name(first)}"
    return PrecisionControl(
        dtype=_dtype_name(dtype), tolerance=tolerance, values=values, total=total,
        changed_rounded=changed_rounded, changed_null=changed_null,
        changed_exact=changed_exact if exact_available else None,
        overlap=_sum_overlaps(overlaps) if other is not None else None,
        null_overlap=_sum_overlaps(null_overlaps) if other is not None else None,
        null_mean_rank_ratio=sum(null_ranks) / len(null_ranks) if null_ranks else None,
    )


# ---------------------------------------------------------------------------------------------- magnitude relation
@dataclass
class MagnitudeProfile:
    """Share of entries changed in each weight-magnitude bin: bin ``i`` holds, in every tensor, the entries whose
    base |w| ranks in the ``i``-th of ``bins`` equal quantile slices of that tensor (bin 0 = smallest |w|), so tensors
    of different scales pool fairly. Three change counts per bin, as in :class:`PrecisionControl`: ``exact`` (any
    change in the stored wider dtype; None when the checkpoints are not wider than ``dtype``), ``rounded`` (|Δ| >
    tolerance after rounding both sides to ``dtype``) and ``null`` (the same update values moved to random entries
    of each tensor before rounding). If ``rounded`` falls with magnitude while ``exact`` stays flat, which entries a
    ``dtype`` diff shows is set by the weights' resolution, not by the optimiser."""

    dtype: str
    tolerance: float
    bins: int
    total: list[int]
    rounded: list[int]
    null: list[int]
    exact: list[int] | None = None

    @staticmethod
    def _shares(counts: list[int] | None, total: list[int]) -> list[float] | None:
        return None if counts is None else [c / t if t else 0.0 for c, t in zip(counts, total)]

    @property
    def rounded_share(self) -> list[float]:
        return self._shares(self.rounded, self.total)

    @property
    def null_share(self) -> list[float]:
        return self._shares(self.null, self.total)

    @property
    def exact_share(self) -> list[float] | None:
        return self._shares(self.exact, self.total)

    def rows(self) -> list[dict]:
        exact = self.exact_share
        return [{"bin": i, "lower_quantile": i / self.bins, "upper_quantile": (i + 1) / self.bins,
                 "entries": self.total[i], "changed_rounded": self.rounded_share[i], "changed_null": self.null_share[i],
                 "changed_exact": "" if exact is None else exact[i]} for i in range(self.bins)]


def magnitude_profile(
    base: torch.nn.Module | str | os.PathLike,
    finetuned: torch.nn.Module | str | os.PathLike,
    bins: int = 10,
    dtype: torch.dtype = torch.bfloat16,
    tolerance: float = 1e-5,
    *,
    seed: int = 0,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> MagnitudeProfile:
    """Changed share per within-tensor |w| quantile bin, measured and under the precision null (see
    :class:`MagnitudeProfile`); streamed tensor by tensor."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    sources = [as_weight_source(base), as_weight_source(finetuned)]
    generator = torch.Generator().manual_seed(seed)
    resolution = torch.finfo(dtype).eps
    total, rounded, null, exact = [0] * bins, [0] * bins, [0] * bins, [0] * bins
    exact_available = True
    for name in tqdm(matched_names(sources, include, exclude), desc="magnitude profile"):
        before, after = (s.get(name) for s in sources)
        exact_available &= all(torch.finfo(w.dtype).eps < resolution for w in (before, after))
        wide = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
        before, after = before.to(wide).reshape(-1), after.to(wide).reshape(-1)
        n = before.numel()
        ranks = torch.empty(n, dtype=torch.long)
        ranks[torch.argsort(before.abs(), stable=True)] = torch.arange(n)
        bin_of = ranks * bins // n
        values = after - before
        before_rounded = before.to(dtype).to(wide)
        shuffled = values[torch.randperm(n, generator=generator)]
        counts = {
            "total": torch.ones(n, dtype=torch.bool),
            "rounded": (after.to(dtype).to(wide) - before_rounded).abs() > tolerance,
            "null": ((before + shuffled).to(dtype).to(wide) - before_rounded).abs() > tolerance,
            "exact": values != 0,
        }
        for key, target in (("total", total), ("rounded", rounded), ("null", null), ("exact", exact)):
            per_bin = torch.bincount(bin_of[counts[key]], minlength=bins)
            for i in range(bins):
                target[i] += int(per_bin[i])
    return MagnitudeProfile(dtype=_dtype_name(dtype), tolerance=tolerance, bins=bins, total=total, rounded=rounded,
                            null=null, exact=exact if exact_available else None)


# ---------------------------------------------------------------------------------------------- agreement of runs
@dataclass
class UpdateAgreement:
    """How close update A (``candidate - base``) comes to update B (``reference - base``) on the selected entries:
    ``relative_error`` = ‖Δa − Δb‖ / ‖Δb‖ (0 = identical, 1 = as far as not moving at all), ``cosine`` of Δa and Δb,
    and ``rounded_equal``, the share of selected entries whose two finetuned values agree after rounding to
    ``dtype`` (what comparing published checkpoints would show)."""

    entries: int
    relative_error: float
    cosine: float
    rounded_equal: float
    norm_candidate: float
    norm_reference: float
    dtype: str


def update_agreement(
    base: torch.nn.Module | str | os.PathLike,
    candidate: torch.nn.Module | str | os.PathLike,
    reference: torch.nn.Module | str | os.PathLike,
    mask: SubnetworkMask | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> UpdateAgreement:
    """Relative error and cosine of two updates from the same base over the entries ``mask`` selects (all entries
    without a mask; tensors absent from the mask count as unselected), accumulated in fp64 tensor by tensor."""
    sources = [as_weight_source(s) for s in (base, candidate, reference)]
    names = matched_names(sources, include, exclude)
    if mask is not None and not any(n in mask for n in names):
        raise ValueError(f"the mask selects no tensor of these checkpoints; names look like {names[:3]}")
    entries = equal = 0
    dot = norm_a = norm_b = norm_diff = 0.0
    for name in tqdm(names, desc="update agreement"):
        before, a, b = (s.get(name) for s in sources)
        if mask is not None:
            if name not in mask:
                continue
            selection = mask[name]
            if selection.shape != before.shape:
                raise ValueError(f"mask shape {tuple(selection.shape)} of {name!r} differs from the weights' "
                                 f"{tuple(before.shape)}")
            before, a, b = before[selection], a[selection], b[selection]
        delta_a = a.double() - before.double()
        delta_b = b.double() - before.double()
        entries += delta_a.numel()
        dot += float((delta_a * delta_b).sum())
        norm_a += float(delta_a.square().sum())
        norm_b += float(delta_b.square().sum())
        norm_diff += float((delta_a - delta_b).square().sum())
        equal += int((a.to(dtype) == b.to(dtype)).sum())
    norm_a, norm_b, norm_diff = math.sqrt(norm_a), math.sqrt(norm_b), math.sqrt(norm_diff)
    return UpdateAgreement(
        entries=entries, relative_error=norm_diff / norm_b if norm_b else float("nan"),
        cosine=dot / (norm_a * norm_b) if norm_a and norm_b else float("nan"),
        rounded_equal=equal / entries if entries else float("nan"), norm_candidate=norm_a, norm_reference=norm_b,
        dtype=_dtype_name(dtype),
    )
