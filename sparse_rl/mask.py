"""``SubnetworkMask``: which entries of which parameters are trained.

A mask is a boolean tensor per parameter, keyed by the parameter's name in ``model.named_parameters()``. Parameters
absent from the mask are frozen. Masks are saved as safetensors with the bits packed (1 bit per entry), so a mask for
SmolLM2-135M is ~17 MB whatever its density.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .checked_files import CorruptFileError, load_checked, metadata_json, save_checked

MASK_FORMAT = "sparse_rl.mask.v2"
LEGACY_MASK_FORMAT = "sparse_rl.mask.v1"  # no checksums; still read

MODULE_TYPES = ("attention", "mlp", "embeddings", "norms", "other")

_MODULE_TYPE_PATTERNS = (  # checked in order: "post_attention_layernorm" is a norm, not attention
    ("norms", ("norm", "ln_", ".ln")),
    ("embeddings", ("embed", "wte", "wpe", "lm_head")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
    ("mlp", ("mlp", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "feed_forward", "ffn", "experts")),
)


def module_type(name: str) -> str:
    """Coarse kind of a parameter from its name: one of :data:`MODULE_TYPES` (``lm_head`` counts as an embedding,
    the output one)."""
    lowered = name.lower()
    for kind, patterns in _MODULE_TYPE_PATTERNS:
        if any(pattern in lowered for pattern in patterns):
            return kind
    return "other"


class SubnetworkMask:
    """Boolean selection per parameter name.

    ``selections[name][i] is True`` means entry ``i`` of parameter ``name`` is trained; everything else stays
    bit-identical. Tensors are kept on CPU; consumers move them where they need them.
    """

    def __init__(self, selections: Mapping[str, torch.Tensor]):
        checked: dict[str, torch.Tensor] = {}
        for name, selection in selections.items():
            if not isinstance(selection, torch.Tensor):
                raise TypeError(f"mask entry {name!r} must be a torch.Tensor, got {type(selection).__name__}")
            if selection.dtype != torch.bool:
                raise TypeError(f"mask entry {name!r} must be a bool tensor, got dtype {selection.dtype}")
            checked[name] = selection.detach().to("cpu").contiguous()
        self.selections = checked

    # ------------------------------------------------------------------ container protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.selections[name]
        except KeyError:
            raise KeyError(f"parameter {name!r} is not in this mask; it holds {len(self.selections)} parameters, "
                           f"e.g. {list(self.selections)[:3]}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.selections

    def __iter__(self):
        return iter(self.selections)

    def __len__(self) -> int:
        return len(self.selections)

    def items(self):
        return self.selections.items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubnetworkMask) or self.selections.keys() != other.selections.keys():
            return False
        return all(torch.equal(v, other.selections[k]) for k, v in self.selections.items())

    def __repr__(self) -> str:
        return (f"SubnetworkMask({len(self)} tensors, {self.num_selected:,}/{self.num_total:,} entries, "
                f"density={self.density:.4f})")

    # ------------------------------------------------------------------ statistics
    @property
    def num_selected(self) -> int:
        return int(sum(int(v.sum()) for v in self.selections.values()))

    @property
    def num_total(self) -> int:
        return int(sum(v.numel() for v in self.selections.values()))

    @property
    def density(self) -> float:
        """Selected entries over all entries of the masked tensors."""
        total = self.num_total
        return self.num_selected / total if total else 0.0

    def density_of(self, model: torch.nn.Module) -> float:
        """Selected entries over *all* parameters of ``model`` (frozen tensors count as unselected)."""
        total = sum(p.numel() for p in model.parameters())
        return self.num_selected / total if total else 0.0

    def per_tensor_density(self) -> dict[str, float]:
        return {name: (float(v.float().mean()) if v.numel() else 0.0) for name, v in self.selections.items()}

    def flat_indices(self, name: str) -> torch.Tensor:
        """Sorted int64 positions of the selected entries of ``name`` in its flattened tensor."""
        return self[name].reshape(-1).nonzero().squeeze(1)

    def density_by_module_type(self) -> dict[str, float]:
        """Selected share of the entries of each :func:`module_type` present in the mask."""
        selected: dict[str, int] = {}
        total: dict[str, int] = {}
        for name, selection in self.selections.items():
            kind = module_type(name)
            selected[kind] = selected.get(kind, 0) + int(selection.sum())
            total[kind] = total.get(kind, 0) + selection.numel()
        return {kind: selected[kind] / total[kind] for kind in MODULE_TYPES if total.get(kind)}

    # ------------------------------------------------------------------ algebra
    def _combine(self, other: SubnetworkMask, op, keep_missing: bool) -> SubnetworkMask:
        if not isinstance(other, SubnetworkMask):
            raise TypeError(f"can only combine a SubnetworkMask with another one, got {type(other).__name__}")
        selections = {}
        for name in list(self.selections) + [n for n in other.selections if n not in self.selections]:
            mine, theirs = self.selections.get(name), other.selections.get(name)
            if mine is not None and theirs is not None:
                if mine.shape != theirs.shape:
                    raise ValueError(f"cannot combine masks: {name!r} has shape {tuple(mine.shape)} in one and "
                                     f"{tuple(theirs.shape)} in the other")
                selections[name] = op(mine, theirs)
            elif keep_missing:  # a tensor absent from a mask is frozen, i.e. all False
                selections[name] = (mine if mine is not None else theirs).clone()
            else:
                present = mine if mine is not None else theirs
                selections[name] = torch.zeros_like(present)
        return SubnetworkMask(selections)

    def union(self, other: SubnetworkMask) -> SubnetworkMask:
        """Entries selected in either mask (tensors absent from one mask count as unselected there)."""
        return self._combine(other, torch.logical_or, keep_missing=True)

    def intersection(self, other: SubnetworkMask) -> SubnetworkMask:
        """Entries selected in both masks; tensors present in only one come out empty."""
        return self._combine(other, torch.logical_and, keep_missing=False)

    def __or__(self, other: SubnetworkMask) -> SubnetworkMask:
        return self.union(other)

    def __and__(self, other: SubnetworkMask) -> SubnetworkMask:
        return self.intersection(other)

    # ------------------------------------------------------------------ validation
    def check_matches(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise a ``ValueError`` naming the first unknown parameter or shape mismatch."""
        shapes = {name: tuple(p.shape) for name, p in named_parameters}
        unknown = [name for name in self.selections if name not in shapes]
        if unknown:
            close = [n for n in shapes if n.endswith(unknown[0].split(".")[-1])][:3]
            raise ValueError(f"mask names parameter {unknown[0]!r} which the model does not have "
                             f"({len(unknown)} unknown in all); model parameters look like "
                             f"{close or list(shapes)[:3]}")
        for name, selection in self.selections.items():
            if tuple(selection.shape) != shapes[name]:
                raise ValueError(f"mask for {name!r} has shape {tuple(selection.shape)} but the parameter has shape "
                                 f"{shapes[name]}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def full(cls, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> SubnetworkMask:
        return cls({name: torch.ones(p.shape, dtype=torch.bool) for name, p in named_parameters})

    # ------------------------------------------------------------------ fingerprints
    def digests(self) -> dict[str, str]:
        """SHA-256 hex digest of each tensor's name, shape and packed selection bits: what ranks compare under DDP,
        what optimizer state and weight-sync patches carry to prove which mask they belong to."""
        digests = {}
        for name, selection in self.selections.items():
            digest = hashlib.sha256(f"{name}:{tuple(selection.shape)}:".encode())
            digest.update(_packed_bits(selection).tobytes())
            digests[name] = digest.hexdigest()
        return digests

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with one uint8 tensor of packed bits per parameter (checksummed, atomically)."""
        packed = {name: torch.from_numpy(_packed_bits(v)) for name, v in self.selections.items()}
        shapes = {name: list(v.shape) for name, v in self.selections.items()}
        save_checked(packed, path, metadata={"format": MASK_FORMAT, "shapes": json.dumps(shapes)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubnetworkMask:
        """Read a mask file; a damaged file (flipped bit, truncation, header shapes that disagree with the packed
        bits) raises :class:`~sparse_rl.checked_files.CorruptFileError` naming it."""
        metadata, packed = load_checked(path, MASK_FORMAT, "mask file", legacy_format=LEGACY_MASK_FORMAT)
        shapes = metadata_json(metadata, "shapes", path, "mask file")
        if set(shapes) != set(packed):
            raise CorruptFileError(f"mask file {path}: its header lists {len(shapes)} tensors but it holds "
                                   f"{len(packed)}")
        selections = {}
        for name, shape in shapes.items():
            count = math.prod(shape)
            bits = packed[name].numpy()
            if not packed_bits_fit(bits, count):
                raise CorruptFileError(f"mask file {path}: {name!r} has shape {shape} in the header ({count} bits) "
                                       f"but {bits.size} packed bytes of {bits.dtype} in the payload (or padding bits "
                                       "set)")
            selections[name] = torch.from_numpy(np.unpackbits(bits, count=count).astype(bool)).reshape(shape)
        return cls(selections)


def _packed_bits(selection: torch.Tensor) -> np.ndarray:
    return np.packbits(selection.reshape(-1).numpy())


def packed_bits_fit(packed: np.ndarray, count: int) -> bool:
    """Whether ``packed`` is exactly ``count`` bits as ``np.packbits`` writes them: ceil(count/8) bytes with zero
    padding bits, so a header shape that disagrees with the payload is caught rather than zero-padded or trimmed."""
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (count + 7) // 8:
        return False
    spare = -count % 8
    return spare == 0 or not packed[-1] & ((1 << spare) - 1)
