"""``SparseDelta``: ship a trained subnetwork the way PEFT ships an adapter.

A model trained inside a :class:`SubnetworkMask` differs from its base only at the selected entries, so the checkpoint
is the *new values* of those entries plus the mask::

    delta = SparseDelta.from_trained(trainer.model, sparse.mask)
    delta.save_pretrained("out/delta")           # delta_model.safetensors + delta_config.json

    base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    delta = SparseDelta.from_pretrained(base, "out/delta")   # merged in place; refuses a different base
    base.save_pretrained("out/merged")                       # a plain transformers checkpoint
    delta.unmerge(base)                                      # back to the base, bit for bit

Values, not differences, are stored (in the model's dtype), so merging reconstructs the trained model bit-exactly.
Per tensor the mask is stored as packed bits or int32 indices, whichever is smaller (indices win below 1/32 density).

Base checksum: SHA-256 over every parameter's name, dtype, shape and the bytes of its *unselected* entries (the
raw bytes with the selected entries zeroed). Those
entries are exactly what the delta leaves to the base, so the checksum can be computed from the trained model at save
time and from the base at load time, and it accepts a base if and only if merging onto it gives the trained model (a
base that differs only at selected entries is overwritten there anyway). Cost: one pass over the weights (see
benchmarks/results/delta_size.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checked_files import CorruptFileError, load_checked, metadata_json, save_checked
from .mask import SubnetworkMask, packed_bits_fit

DELTA_FORMAT = "sparse_rl.delta.v2"
LEGACY_DELTA_FORMAT = "sparse_rl.delta.v1"  # weights without checksums; still read
DELTA_CONFIG_NAME = "delta_config.json"
DELTA_WEIGHTS_NAME = "delta_model.safetensors"
CHECKSUM_METHOD = ("sha256 over named_parameters() sorted by name: name, dtype, shape, raw bytes with the selected "
                   "entries zeroed (i.e. the bytes of the unselected entries)")

_VALUES, _BITS, _INDICES = ".selected_values", ".mask_bits", ".mask_indices"
_HASH_CHUNK = 1 << 22  # entries hashed at a time, bounds the temporary copy
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class SparseDeltaConfig:
    """What a delta folder says about itself (written as ``delta_config.json`` next to the weights).

    Args:
        base_model_name_or_path: hub id or folder of the base model the delta was trained from.
        base_checksum: :func:`base_checksum` of that base under the delta's mask.
        num_selected: entries stored in the delta.
        num_parameters: entries of all parameters of the model (frozen ones included).
        checksum_method: how ``base_checksum`` was computed.
    """

    base_model_name_or_path: str | None
    base_checksum: str
    num_selected: int
    num_parameters: int
    checksum_method: str = CHECKSUM_METHOD
    format: str = DELTA_FORMAT
    sparse_rl_version: str = field(default_factory=lambda: _version())

    @property
    def density(self) -> float:
        return self.num_selected / self.num_parameters if self.num_parameters else 0.0

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {**asdict(self), "density": self.density}
        (folder / DELTA_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> SparseDeltaConfig:
        path = Path(folder) / DELTA_CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {DELTA_CONFIG_NAME} in {folder}: not a sparse_rl delta folder")
        try:
            payload = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptFileError(f"{path} is damaged: {error}") from None
        if payload.get("format") not in (DELTA_FORMAT, LEGACY_DELTA_FORMAT):
            raise ValueError(f"{path} has format {payload.get('format')!r}, expected {DELTA_FORMAT!r}")
        payload.pop("density", None)
        try:
            return cls(**payload)
        except TypeError as error:
            raise CorruptFileError(f"{path} does not describe a delta: {error}") from None


def base_checksum(model: torch.nn.Module, mask: SubnetworkMask) -> str:
    """SHA-256 of the entries of ``model`` that ``mask`` leaves untouched (see the module docstring).

    Each parameter's raw bits are hashed with its selected entries set to zero bits (an integer view keeps every bit
    of the unselected entries, NaN payloads and -0.0 included); zeroing is ~2x faster than gathering them.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}\n".encode())
        bits = param.detach().reshape(-1).view(_INT_OF_SIZE[param.element_size()])
        selection = mask.selections.get(name)
        selected = None if selection is None else selection.reshape(-1)
        for start in range(0, bits.numel(), _HASH_CHUNK):
            chunk = bits[start : start + _HASH_CHUNK]
            if selected is not None:
                chunk = chunk.masked_fill(selected[start : start + _HASH_CHUNK].to(chunk.device), 0)
            digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def gather_selected(model: torch.nn.Module, mask: SubnetworkMask) -> dict[str, torch.Tensor]:
    """Copies of the selected entries of each masked parameter, in flat-index order (tensors with none are skipped)."""
    params = dict(model.named_parameters())
    values = {}
    with torch.no_grad():
        for name, selection in mask.items():
            if not bool(selection.any()):
                continue
            index = mask.flat_indices(name).to(params[name].device)
            values[name] = params[name].detach().reshape(-1).index_select(0, index).clone()
    return values


def _flat_view(param: torch.Tensor, name: str) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError(f"parameter {name!r} is not contiguous; sparse_rl writes selected entries through a flat view "
                         "(call .contiguous() on it, e.g. reload the model)")
    return param.detach().view(-1)


def changes_outside_mask(
    model: torch.nn.Module, mask: SubnetworkMask, base: torch.nn.Module | str | os.PathLike
) -> dict[str, int]:
    """Per parameter, the unselected entries whose bits differ between ``model`` and ``base`` (the base cast to the
    model's dtype, as ``from_pretrained(..., dtype=...)`` would load it); parameters without any are left out."""
    from .discovery import as_weight_source

    source = as_weight_source(base)
    stored = {**source.aliases, **{n: n for n in source.names}}
    changed, compared = {}, 0
    for name, param in model.named_parameters():
        if name not in stored:
            continue
        before = source.get(stored[name])
        if tuple(before.shape) != tuple(param.shape):
            raise ValueError(f"{name!r} has shape {tuple(param.shape)} in the model but {tuple(before.shape)} in "
                             f"the base {source.description}: not the model's base")
        bits = _INT_OF_SIZE[param.element_size()]
        differs = param.detach().cpu().reshape(-1).view(bits) != before.to(param.dtype).reshape(-1).view(bits)
        selection = mask.selections.get(name)
        if selection is not None:
            differs &= ~selection.reshape(-1)
        compared += 1
        if int(differs.sum()):
            changed[name] = int(differs.sum())
    if not compared:
        raise ValueError(f"the base {source.description} holds none of the model's parameter names")
    return changed


def _is_checkpoint_folder(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return folder.is_dir() and any((folder / name).exists() for name in
                                   ("model.safetensors", "model.safetensors.index.json"))


class SparseDelta:
    """The trained values of a subnetwork on top of a named base model.

    ``selected_values[name]`` holds the values of ``mask[name]``'s selected entries in flat-index order, in the
    model's dtype. ``merge`` keeps a copy of the base's values at those entries (d·N values) so ``unmerge`` restores
    the base bit-exactly; pass ``keep_base_values=False`` to save that memory and give up ``unmerge``.
    """

    def __init__(self, mask: SubnetworkMask, selected_values: dict[str, torch.Tensor], config: SparseDeltaConfig):
        for name, values in selected_values.items():
            if name not in mask:
                raise ValueError(f"selected values given for {name!r}, which the mask does not contain")
            expected = int(mask[name].sum())
            if values.dim() != 1 or values.numel() != expected:
                raise ValueError(f"{name!r}: expected a 1-D tensor of {expected} selected values, got shape "
                                 f"{tuple(values.shape)}")
        missing = [n for n, s in mask.items() if n not in selected_values and bool(s.any())]
        if missing:
            raise ValueError(f"no selected values for {missing[0]!r} ({len(missing)} masked tensors lack values)")
        self.mask = mask
        self.selected_values = dict(selected_values)
        self.config = config
        self._merged_into: weakref.ref | None = None
        self._base_values: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"SparseDelta({len(self.selected_values)} tensors, {self.config.num_selected:,} values, "
                f"density={self.config.density:.4f}, base={self.config.base_model_name_or_path!r})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_trained(
        cls, model: torch.nn.Module, mask: SubnetworkMask, base_model_name_or_path: str | None = None, *,
        base: torch.nn.Module | str | os.PathLike | None = None,
    ) -> SparseDelta:
        """Capture the selected entries of ``model``, which must have changed only inside ``mask`` since the base
        (what ``sparsify`` guarantees). ``base_model_name_or_path`` defaults to ``model.config._name_or_path``.

        A delta cannot carry changes outside the mask, so they are refused, with counts, rather than dropped: the
        model is compared with ``base`` (a model, a checkpoint folder or a .safetensors file), or, when ``base`` is
        not given and ``base_model_name_or_path`` is a local checkpoint folder, with that folder (memory-mapped, one
        tensor at a time). With neither, nothing is compared.
        """
        named = list(model.named_parameters())
        mask.check_matches(named)
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if base is None and base_model_name_or_path is not None and _is_checkpoint_folder(base_model_name_or_path):
            base = base_model_name_or_path
        if base is not None:
            changed = changes_outside_mask(model, mask, base)
            if changed:
                first = next(iter(changed))
                raise ValueError(
                    f"the model differs from its base outside the mask in {sum(changed.values()):,} entries of "
                    f"{len(changed)} tensor(s) (first {first!r}: {changed[first]:,}); a delta keeps only the selected "
                    "entries and would drop those changes. Train with sparsify (which keeps unselected entries fixed), "
                    "or build the mask to cover them")
        config = SparseDeltaConfig(
            base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
            base_checksum=base_checksum(model, mask),
            num_selected=mask.num_selected,
            num_parameters=sum(p.numel() for _, p in named),
        )
        values = {name: v.cpu() for name, v in gather_selected(model, mask).items()}
        return cls(mask, values, config)

    # ------------------------------------------------------------------ disk
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``delta_model.safetensors`` (values + mask) and ``delta_config.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, shapes = {}, {}
        for name, values in self.selected_values.items():
            selection = self.mask[name].reshape(-1)
            shapes[name] = list(self.mask[name].shape)
            tensors[name + _VALUES] = values.detach().cpu().contiguous()
            bits_bytes = (selection.numel() + 7) // 8
            if 4 * values.numel() < bits_bytes:
                tensors[name + _INDICES] = self.mask.flat_indices(name).to(torch.int32)
            else:
                tensors[name + _BITS] = torch.from_numpy(np.packbits(selection.numpy()))
        self.config.save_pretrained(folder)
        config_bytes = (folder / DELTA_CONFIG_NAME).read_bytes()
        save_checked(tensors, folder / DELTA_WEIGHTS_NAME, metadata={
            "format": DELTA_FORMAT, "shapes": json.dumps(shapes),
            "config_sha256": hashlib.sha256(config_bytes).hexdigest()})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SparseDelta:
        """Read a delta folder without applying it; a damaged file raises an error naming it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a delta folder (save_pretrained writes a folder)")
        path, config_path = folder / DELTA_WEIGHTS_NAME, folder / DELTA_CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"no {DELTA_CONFIG_NAME} in {folder}: not a sparse_rl delta folder")
        meta, stored = load_checked(path, DELTA_FORMAT, "delta weights", legacy_format=LEGACY_DELTA_FORMAT)
        if meta.get("format") == DELTA_FORMAT:  # the weights vouch for their config
            if meta.get("config_sha256") != hashlib.sha256(config_path.read_bytes()).hexdigest():
                raise CorruptFileError(f"{config_path} does not match the checksum that {path} holds for it: one of "
                                       "the two files is damaged or was replaced")
        config = SparseDeltaConfig.from_pretrained(folder)
        selections, values = {}, {}
        for name, shape in metadata_json(meta, "shapes", path, "delta weights").items():
            count = math.prod(shape)
            if name + _VALUES not in stored or (name + _BITS not in stored and name + _INDICES not in stored):
                raise CorruptFileError(f"{path}: {name!r} is listed in the header but its tensors are missing")
            if name + _BITS in stored:
                packed = stored[name + _BITS].numpy()
                if not packed_bits_fit(packed, count):
                    raise CorruptFileError(f"{path}: {name!r} has shape {shape} in the header but {packed.size} "
                                           "packed mask bytes")
                selection = torch.from_numpy(np.unpackbits(packed, count=count).astype(bool))
            else:
                index = stored[name + _INDICES].long()
                if index.numel() and (bool((index[1:] <= index[:-1]).any()) or index[0] < 0 or index[-1] >= count):
                    raise CorruptFileError(f"{path}: indices of {name!r} are not sorted, unique and in range")
                selection = torch.zeros(count, dtype=torch.bool)
                selection[index] = True
            selections[name] = selection.reshape(shape)
            values[name] = stored[name + _VALUES]
        if sum(v.numel() for v in values.values()) != config.num_selected:
            raise CorruptFileError(f"{folder}: {DELTA_CONFIG_NAME} says {config.num_selected} selected entries but "
                                   f"{path} holds {sum(v.numel() for v in values.values())}")
        return cls(SubnetworkMask(selections), values, config)

    @classmethod
    def from_pretrained(
        cls, model: torch.nn.Module, folder: str | os.PathLike, keep_base_values: bool = True
    ) -> SparseDelta:
        """Load the delta in ``folder`` and merge it into ``model`` in place (the base it was trained from)."""
        delta = cls.load(folder)
        delta.merge(model, keep_base_values=keep_base_values)
        return delta

    # ------------------------------------------------------------------ merge / unmerge
    def verify_base(self, model: torch.nn.Module) -> None:
        """Raise a ``ValueError`` unless ``model`` is (or is merged from) the base this delta was trained on."""
        named = list(model.named_parameters())
        self.mask.check_matches(named)
        params = dict(named)
        for name, values in self.selected_values.items():
            if params[name].dtype != values.dtype:
                raise ValueError(f"{name!r} is {params[name].dtype} in the model but {values.dtype} in the delta; "
                                 f"load the base with dtype={values.dtype}")
        found = base_checksum(model, self.mask)
        if found != self.config.base_checksum:
            raise ValueError(
                f"this model is not the base the delta was trained on ({self.config.base_model_name_or_path!r}): its "
                f"entries outside the subnetwork hash to {found[:16]}..., the delta expects "
                f"{self.config.base_checksum[:16]}...; load {self.config.base_model_name_or_path!r} in the same dtype"
                ", or the trained model had changed outside its mask before the delta was saved (from_trained "
                "refuses that when it is given base=)"
            )

    @property
    def merged(self) -> bool:
        return self._merged_into is not None and self._merged_into() is not None

    def merge(self, model: torch.nn.Module, keep_base_values: bool = True) -> None:
        """Write the trained values into ``model`` in place after checking it is the right base."""
        if self.merged:
            raise RuntimeError("this delta is already merged into a model; unmerge it first (merging twice would "
                               "overwrite the kept base values)")
        self.verify_base(model)
        params = dict(model.named_parameters())
        base_values = {}
        with torch.no_grad():
            for name, values in self.selected_values.items():
                flat = _flat_view(params[name], name)
                index = self.mask.flat_indices(name).to(flat.device)
                if keep_base_values:
                    base_values[name] = flat.index_select(0, index)
                flat.index_copy_(0, index, values.to(flat.device))
        self._base_values = base_values if keep_base_values else None
        self._merged_into = weakref.ref(model)

    def unmerge(self, model: torch.nn.Module) -> None:
        """Put the base's values back into ``model`` (the model ``merge`` was called on)."""
        if not self.merged or self._merged_into() is not model:
            raise RuntimeError("this delta is not merged into this model")
        if self._base_values is None:
            raise RuntimeError("merge(keep_base_values=False) dropped the base values; reload the base model instead")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, values in self._base_values.items():
                flat = _flat_view(params[name], name)
                flat.index_copy_(0, self.mask.flat_indices(name).to(flat.device), values)
        self._base_values = None
        self._merged_into = None


def _version() -> str:
    from . import __version__

    return __version__
