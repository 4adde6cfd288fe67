"""``SubnetworkMask``: which entries of which parameters are trained.

A mask is a boolean tensor per parameter, keyed by the parameter's name in ``model.named_parameters()``. Parameters
absent from the mask are frozen. A mask holds its selections packed, 1 bit per entry (a mask for SmolLM2-135M is ~17 MB
whatever its density, in memory and as safetensors on disk), with each tensor's selected count; ``mask[name]`` and
``mask.items()`` unpack a fresh bool tensor on each access. Masks are immutable: combine them (``|``, ``&``) or build
a new one from bool tensors. The int32 positions that compact gradient hooks and the shared reference index with come
from :meth:`SubnetworkMask.selected_indices`, one tensor per parameter shared by its holders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping

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

    ``mask[name][i] is True`` means entry ``i`` of parameter ``name`` is trained; everything else stays
    bit-identical. Stored packed on CPU (1 bit per entry, see the module docstring); consumers unpack or index what
    they need and move it where they need it.
    """

    def __init__(self, selections: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
        """``selections``: bool tensor per parameter name, as a mapping or as ``(name, tensor)`` pairs (a generator
        lets each tensor be packed and freed before the next one is made)."""
        packed: dict[str, np.ndarray] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        counts: dict[str, int] = {}
        pairs = selections.items() if isinstance(selections, Mapping) else selections
        for name, selection in pairs:
            if not isinstance(selection, torch.Tensor):
                raise TypeError(f"mask entry {name!r} must be a torch.Tensor, got {type(selection).__name__}")
            if selection.dtype != torch.bool:
                raise TypeError(f"mask entry {name!r} must be a bool tensor, got dtype {selection.dtype}")
            flat = selection.detach().to("cpu").reshape(-1).numpy()
            packed[name], shapes[name], counts[name] = np.packbits(flat), tuple(selection.shape), int(
                np.count_nonzero(flat))
        self._init_packed(packed, shapes, counts)

    def _init_packed(self, packed: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                     counts: dict[str, int]) -> None:
        self._packed, self._shapes, self._counts = packed, shapes, counts
        self._indices: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __getstate__(self) -> dict:  # pickling (e.g. to worker processes): the shared index tensors stay behind
        return {"packed": self._packed, "shapes": self._shapes, "counts": self._counts}

    def __setstate__(self, state: dict) -> None:
        self._init_packed(state["packed"], state["shapes"], state["counts"])

    @classmethod
    def _from_packed(cls, packed: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> SubnetworkMask:
        """A mask of already packed bits (``np.packbits`` of each flattened selection, zero padding bits)."""
        mask = cls.__new__(cls)
        counts = {name: int(np.bitwise_count(bits).sum()) if hasattr(np, "bitwise_count")
                  else int(np.unpackbits(bits).sum()) for name, bits in packed.items()}
        mask._init_packed(dict(packed), {n: tuple(s) for n, s in shapes.items()}, counts)
        return mask

    @property
    def selections(self) -> Mapping[str, torch.Tensor]:
        """Read-only mapping of parameter name to its bool selection, unpacked on each access."""
        return _Selections(self)

    def _unpack(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        bits = np.unpackbits(self._packed[name], count=math.prod(shape))
        return torch.from_numpy(bits.view(np.bool_)).reshape(shape)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of parameter ``name``'s selection, without unpacking it."""
        if name not in self._shapes:
            self[name]  # raises the KeyError naming the mask's parameters
        return self._shapes[name]

    def packed_bits(self, name: str) -> np.ndarray:
        """``name``'s selection as stored: ``np.packbits`` of the flattened bools (read-only view, no copy)."""
        if name not in self._packed:
            self[name]
        bits = self._packed[name].view()
        bits.flags.writeable = False
        return bits

    def count(self, name: str) -> int:
        """Selected entries of parameter ``name`` (counted once, when the mask was built)."""
        if name not in self._counts:
            self[name]
        return self._counts[name]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed selections this mask holds (1 bit per entry, rounded up to a byte per tensor)."""
        return sum(bits.nbytes for bits in self._packed.values())

    def selected_indices(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Flat positions of ``name``'s selected entries as int32 on ``device``: 4 bytes per *selected* entry.

        Computed once and shared: while anyone holds the tensor (the compact gradient hook, the shared reference),
        every caller gets that same tensor, so holders of the same parameter's positions pay for them once; it is
        freed with its last holder. Tensors of 2**31 entries or more do not fit int32 positions (ValueError)."""
        numel = math.prod(self.shape_of(name))
        if numel >= 2**31:
            raise ValueError(f"int32 positions need tensors of fewer than 2**31 entries, {name!r} has {numel}")
        key = (name, str(torch.device(device)))
        indices = self._indices.get(key)
        if indices is None:
            bits = np.unpackbits(self._packed[name], count=numel).view(np.bool_)  # flat: no tensor of the shape
            indices = torch.from_numpy(np.flatnonzero(bits).astype(np.int32)).to(device)
            self._indices[key] = indices
        return indices

    # ------------------------------------------------------------------ container protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._packed:
            raise KeyError(f"parameter {name!r} is not in this mask; it holds {len(self._packed)} parameters, "
                           f"e.g. {list(self._packed)[:3]}") from None
        return self._unpack(name)

    def __contains__(self, name: object) -> bool:
        return name in self._packed

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def items(self):
        return self.selections.items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubnetworkMask) or self._shapes != other._shapes:
            return False
        return all(np.array_equal(bits, other._packed[name]) for name, bits in self._packed.items())

    def __repr__(self) -> str:
        return (f"SubnetworkMask({len(self)} tensors, {self.num_selected:,}/{self.num_total:,} entries, "
                f"density={self.density:.4f})")

    # ------------------------------------------------------------------ statistics
    @property
    def num_selected(self) -> int:
        return sum(self._counts.values())

    @property
    def num_total(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

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
        return {name: (self._counts[name] / math.prod(shape) if math.prod(shape) else 0.0)
                for name, shape in self._shapes.items()}

    def flat_indices(self, name: str) -> torch.Tensor:
        """Sorted int64 positions of the selected entries of ``name`` in its flattened tensor."""
        return self[name].reshape(-1).nonzero().squeeze(1)

    def density_by_module_type(self) -> dict[str, float]:
        """Selected share of the entries of each :func:`module_type` present in the mask."""
        selected: dict[str, int] = {}
        total: dict[str, int] = {}
        for name, shape in self._shapes.items():
            kind = module_type(name)
            selected[kind] = selected.get(kind, 0) + self._counts[name]
            total[kind] = total.get(kind, 0) + math.prod(shape)
        return {kind: selected[kind] / total[kind] for kind in MODULE_TYPES if total.get(kind)}

    # ------------------------------------------------------------------ algebra
    def _combine(self, other: SubnetworkMask, op, keep_missing: bool) -> SubnetworkMask:
        if not isinstance(other, SubnetworkMask):
            raise TypeError(f"can only combine a SubnetworkMask with another one, got {type(other).__name__}")
        selections = {}
        for name in list(self) + [n for n in other if n not in self]:
            mine = self[name] if name in self else None
            theirs = other[name] if name in other else None
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
        unknown = [name for name in self._shapes if name not in shapes]
        if unknown:
            close = [n for n in shapes if n.endswith(unknown[0].split(".")[-1])][:3]
            raise ValueError(f"mask names parameter {unknown[0]!r} which the model does not have "
                             f"({len(unknown)} unknown in all); model parameters look like "
                             f"{close or list(shapes)[:3]}")
        for name, shape in self._shapes.items():
            if shape != shapes[name]:
                raise ValueError(f"mask for {name!r} has shape {shape} but the parameter has shape {shapes[name]}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def full(cls, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> SubnetworkMask:
        return cls({name: torch.ones(p.shape, dtype=torch.bool) for name, p in named_parameters})

    # ------------------------------------------------------------------ fingerprints
    def digests(self) -> dict[str, str]:
        """SHA-256 hex digest of each tensor's name, shape and packed selection bits: what ranks compare under DDP,
        what optimizer state and weight-sync patches carry to prove which mask they belong to."""
        digests = {}
        for name, bits in self._packed.items():
            digest = hashlib.sha256(f"{name}:{self._shapes[name]}:".encode())
            digest.update(bits.tobytes())
            digests[name] = digest.hexdigest()
        return digests

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with one uint8 tensor of packed bits per parameter (checksummed, atomically)."""
        packed = {name: torch.from_numpy(bits) for name, bits in self._packed.items()}
        shapes = {name: list(shape) for name, shape in self._shapes.items()}
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
        bits_of = {}
        for name, shape in shapes.items():
            count = math.prod(shape)
            bits = packed[name].numpy()
            if not packed_bits_fit(bits, count):
                raise CorruptFileError(f"mask file {path}: {name!r} has shape {shape} in the header ({count} bits) "
                                       f"but {bits.size} packed bytes of {bits.dtype} in the payload (or padding bits "
                                       "set)")
            bits_of[name] = bits
        return cls._from_packed(bits_of, shapes)


class _Selections(Mapping):
    """``SubnetworkMask.selections``: a read-only view that unpacks each selection when it is read."""

    def __init__(self, mask: SubnetworkMask):
        self._mask = mask

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._mask[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mask)

    def __len__(self) -> int:
        return len(self._mask)

    def __contains__(self, name: object) -> bool:
        return name in self._mask


def packed_bits_fit(packed: np.ndarray, count: int) -> bool:
    """Whether ``packed`` is exactly ``count`` bits as ``np.packbits`` writes them: ceil(count/8) bytes with zero
    padding bits, so a header shape that disagrees with the payload is caught rather than zero-padded or trimmed."""
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (count + 7) // 8:
        return False
    spare = -count % 8
    return spare == 0 or not packed[-1] & ((1 << spare) - 1)
