"""``WeightPatch``: what the trainer sends the generation server after an optimizer step, and its wire format.

A patch holds, per parameter (Hugging Face name), the *new absolute values* of the entries whose value in the server's
dtype changed since the previous patch, and where they are. Absolute values (not differences) keep the receiver from
accumulating rounding, and make a replayed patch harmless. Only entries selected by the mask can ever change, so
positions can be written relative to the mask's selection, which both ends hold:

- ``"all"``: every selected entry, in flat-index order; no positions at all (anchors).
- ``"flat_i32"``: int32 flat indices into the parameter (the format vLLM's ``sparse_nccl`` engine takes).
- ``"rank_u16"``: uint16 rank among the tensor's selected entries (tensors with at most 65536 selected entries).
- ``"rank_bits"``: one bit per selected entry, set where it changed.
- ``"rank_gaps"``: LEB128 varints of the gaps between successive ranks (1 byte per changed entry when at least one
  selected entry in ~128 changed, 2 bytes down to one in ~16000).

The producer picks the smallest (``index_encoding="auto"``) or always ``"flat_i32"``.

A stream's first patch is either an **anchor** (every selected entry) or, with ``first_sync="base"``, a patch
*relative to the base*: ``base_start`` then holds the fingerprint of the selected entries it was diffed from (the
base's, in the server dtype), and only a receiver that has applied nothing since it loaded that very base takes it.

Every patch carries a sender ``stream`` id (one per producer, so a restarted or resumed trainer is recognisably a new
sender), a ``sequence`` number, the mask's fingerprint, the base's fingerprint (the unselected entries in the server
dtype), the server dtype, and a SHA-256 checksum over its header and payload; :func:`decode_patch` refuses truncated or
altered bytes before anything reads them.

Wire format: ``b"SRLP"`` + little-endian uint32 header length + zlib-compressed UTF-8 JSON header (the tensors as
``[name, encoding, count, position bytes, value bytes]`` rows; names repeat their prefixes, so it compresses ~10x) +
payload (per tensor: position bytes, then value bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .scan import gap_varints

PATCH_FORMAT = "sparse_rl.weight_patch.v1"
MAGIC = b"SRLP"
ENCODINGS = ("all", "flat_i32", "rank_u16", "rank_bits", "rank_gaps")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_INT_VIEW = {2: torch.int16, 4: torch.int32}


class PatchRefused(ValueError):
    """A receiver refused a patch; its weights are unchanged."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"server dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise PatchRefused(f"patch names dtype {name!r}; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class TensorPatch:
    """New values of some selected entries of one parameter.

    ``positions`` are the encoded positions (see the module docstring; empty for ``"all"``), ``values`` a 1-D tensor
    in the server dtype, one per changed entry, in increasing flat-index order.
    """

    name: str
    encoding: str
    positions: bytes
    values: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return len(self.positions) + self.values.numel() * self.values.element_size()


@dataclass
class WeightPatch:
    """One sync's worth of changes (see the module docstring)."""

    stream: str
    sequence: int
    anchor: bool
    mask_fingerprint: str
    base_fingerprint: str
    dtype: str
    tensors: list[TensorPatch] = field(default_factory=list)
    base_start: str = ""

    @property
    def num_values(self) -> int:
        return sum(t.count for t in self.tensors)

    @property
    def is_empty(self) -> bool:
        return self.num_values == 0

    def payload_nbytes(self) -> int:
        """Bytes of positions and values (the wire format adds a header of ~100 bytes per tensor)."""
        return sum(t.nbytes for t in self.tensors)


# ---------------------------------------------------------------------------------------------- positions
def _flat_bytes(selected_flat, ranks: torch.Tensor) -> bytes:
    flat = selected_flat(ranks) if callable(selected_flat) else selected_flat[ranks]
    return flat.to(torch.int32).numpy().tobytes()


def encode_positions(changed: torch.Tensor, num_selected: int,
                     selected_flat: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                     index_encoding: str) -> tuple[str, bytes]:
    """Encode the sorted ranks ``changed`` (positions among the ``num_selected`` selected entries, whose flat indices
    are ``selected_flat``, or the function giving the flat indices of ranks) in the smallest allowed form;
    ``index_encoding`` is ``"auto"`` or ``"flat_i32"``."""
    count = changed.numel()
    if index_encoding == "flat_i32":
        return "flat_i32", _flat_bytes(selected_flat, changed)
    if count == num_selected:
        return "all", b""
    ranks = changed.numpy()
    if gap_varints is not None:  # numba: one pass, no temporaries (same bytes as the numpy code below)
        gaps, gap_lengths = None, None
        gap_bytes = int(gap_varints.total_bytes(ranks))
    else:
        gaps = np.diff(ranks, prepend=-1) - 1
        gap_lengths = _varint_lengths(gaps)
        gap_bytes = int(gap_lengths.sum())
    sizes = {"flat_i32": 4 * count, "rank_bits": (num_selected + 7) // 8, "rank_gaps": gap_bytes}
    if num_selected <= 1 << 16:
        sizes["rank_u16"] = 2 * count
    encoding = min(sizes, key=lambda key: (sizes[key], key != "flat_i32"))
    if encoding == "flat_i32":
        return encoding, _flat_bytes(selected_flat, changed)
    if encoding == "rank_u16":
        return encoding, ranks.astype(np.uint16).tobytes()
    if encoding == "rank_gaps":
        if gaps is None:
            return encoding, gap_varints.encode(ranks, gap_bytes).tobytes()
        return encoding, _varint_encode(gaps.astype(np.uint64), gap_lengths)
    bits = np.zeros(num_selected, dtype=bool)
    bits[ranks] = True
    return encoding, np.packbits(bits).tobytes()


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(len(values), dtype=np.int64)
    for shift in range(7, 63, 7):
        lengths += values >= (1 << shift)
    return lengths


def _varint_encode(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, low groups first, high bit set on every byte but a value's last."""
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for k in range(int(lengths.max()) if len(lengths) else 0):
        chosen = lengths > k
        group = (values[chosen] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[chosen] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[chosen] + k] = (group | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(data: bytes, count: int, name: str) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != count or (len(raw) and raw[-1] >= 0x80):
        raise PatchRefused(f"{name}: {len(ends)} varint gaps in the positions for {count} values")
    starts = np.concatenate([[0], ends[:-1] + 1]) if count else ends
    lengths = ends - starts + 1
    if count and int(lengths.max()) > 9:
        raise PatchRefused(f"{name}: varint gap longer than 9 bytes")
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max()) if count else 0):
        chosen = lengths > k
        values[chosen] |= (raw[starts[chosen] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values


def decode_ranks(encoding: str, positions: bytes, count: int, num_selected: int, selection: torch.Tensor,
                 selected_flat: torch.Tensor, name: str) -> torch.Tensor:
    """Ranks (int64, among the selected entries) of a tensor patch's values; refuses positions outside the
    selection, unsorted or repeated positions, and counts that do not match."""
    if encoding == "all":
        if positions or count != num_selected:
            raise PatchRefused(f"{name}: an 'all' patch must hold every one of the {num_selected} selected entries "
                               f"and no positions, got {count} values and {len(positions)} position bytes")
        return torch.arange(num_selected)
    if encoding == "flat_i32":
        if len(positions) != 4 * count:
            raise PatchRefused(f"{name}: {count} values but {len(positions)} bytes of int32 indices")
        flat = torch.from_numpy(np.frombuffer(positions, dtype=np.int32).astype(np.int64))
        numel = selection.numel()
        if count and (int(flat.min()) < 0 or int(flat.max()) >= numel):
            raise PatchRefused(f"{name}: flat index out of range [0, {numel})")
        if count and not bool(selection.reshape(-1)[flat].all()):
            bad = int(flat[~selection.reshape(-1)[flat]][0])
            raise PatchRefused(f"{name}: index {bad} is not selected by the mask; a patch only sets selected entries")
        ranks = torch.searchsorted(selected_flat, flat)
    elif encoding == "rank_u16":
        if len(positions) != 2 * count:
            raise PatchRefused(f"{name}: {count} values but {len(positions)} bytes of uint16 ranks")
        ranks = torch.from_numpy(np.frombuffer(positions, dtype=np.uint16).astype(np.int64))
        if count and int(ranks.max()) >= num_selected:
            raise PatchRefused(f"{name}: rank {int(ranks.max())} but the mask selects {num_selected} entries")
    elif encoding == "rank_gaps":
        gaps = _varint_decode(positions, count, name)
        if count and int(gaps.max()) >= num_selected:
            raise PatchRefused(f"{name}: rank gap beyond the {num_selected} selected entries")
        ranks = torch.from_numpy(np.cumsum(gaps.astype(np.int64) + 1) - 1)
        if count and int(ranks[-1]) >= num_selected:
            raise PatchRefused(f"{name}: rank {int(ranks[-1])} but the mask selects {num_selected} entries")
    elif encoding == "rank_bits":
        if len(positions) != (num_selected + 7) // 8:
            raise PatchRefused(f"{name}: {len(positions)} bytes of rank bits for {num_selected} selected entries")
        bits = np.unpackbits(np.frombuffer(positions, dtype=np.uint8), count=num_selected).astype(bool)
        ranks = torch.from_numpy(np.flatnonzero(bits))
        if ranks.numel() != count:
            raise PatchRefused(f"{name}: {int(ranks.numel())} bits set for {count} values")
    else:
        raise PatchRefused(f"{name}: unknown position encoding {encoding!r}; known: {ENCODINGS}")
    if count > 1 and not bool((ranks[1:] > ranks[:-1]).all()):
        raise PatchRefused(f"{name}: positions must be strictly increasing (no repeats)")
    return ranks


# ---------------------------------------------------------------------------------------------- wire format
def encode_patch(patch: WeightPatch) -> bytes:
    """The bytes of ``patch`` (see the module docstring)."""
    parts = []
    tensors = []
    for tensor in patch.tensors:
        value_bytes = _value_bytes(tensor.values)
        tensors.append([tensor.name, tensor.encoding, tensor.count, len(tensor.positions), len(value_bytes)])
        parts += [tensor.positions, value_bytes]
    payload = b"".join(parts)
    header = {"format": PATCH_FORMAT, "stream": patch.stream, "sequence": patch.sequence, "anchor": patch.anchor,
              "mask_fingerprint": patch.mask_fingerprint, "base_fingerprint": patch.base_fingerprint,
              "dtype": patch.dtype, "base_start": patch.base_start, "payload_bytes": len(payload), "tensors": tensors}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    checksum = hashlib.sha256(header_bytes + payload).hexdigest().encode()
    framed = zlib.compress(header_bytes[:-1] + b',"checksum":"' + checksum + b'"}')
    return MAGIC + struct.pack("<I", len(framed)) + framed + payload


def decode_patch(data: bytes | bytearray | memoryview) -> WeightPatch:
    """Parse and verify bytes from :func:`encode_patch`; raises :class:`PatchRefused` on anything malformed,
    truncated or altered (checksum)."""
    data = memoryview(data).cast("B")
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise PatchRefused(f"not a sparse_rl weight patch ({len(data)} bytes, no {MAGIC!r} header)")
    (header_length,) = struct.unpack("<I", data[4:8])
    if 8 + header_length > len(data):
        raise PatchRefused(f"truncated patch: header of {header_length} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(zlib.decompress(bytes(data[8 : 8 + header_length])))
        checksum = header.pop("checksum")
    except (ValueError, KeyError, AttributeError, zlib.error) as error:
        raise PatchRefused(f"unreadable patch header ({error})") from None
    if header.get("format") != PATCH_FORMAT:
        raise PatchRefused(f"patch format {header.get('format')!r}, expected {PATCH_FORMAT!r}")
    payload = data[8 + header_length :]
    if len(payload) != header["payload_bytes"]:
        raise PatchRefused(f"truncated patch: {len(payload)} payload bytes, the header announces "
                           f"{header['payload_bytes']}")
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if hashlib.sha256(header_bytes + payload).hexdigest() != checksum:
        raise PatchRefused("patch checksum mismatch: the bytes were altered or cut in transit")
    dtype = dtype_from_name(header["dtype"])
    tensors = []
    offset = 0
    try:
        rows = [(str(n), str(e), int(c), int(p), int(v)) for n, e, c, p, v in header["tensors"]]
    except (TypeError, ValueError, KeyError) as error:
        raise PatchRefused(f"unreadable tensor table in the patch header ({error})") from None
    for name, encoding, count, position_bytes, value_bytes in rows:
        positions = bytes(payload[offset : offset + position_bytes])
        offset += position_bytes
        values = _values_from_bytes(payload[offset : offset + value_bytes], dtype)
        offset += value_bytes
        if values.numel() != count:
            raise PatchRefused(f"{name}: {values.numel()} values, the header announces {count}")
        tensors.append(TensorPatch(name, encoding, positions, values))
    return WeightPatch(stream=header["stream"], sequence=int(header["sequence"]), anchor=bool(header["anchor"]),
                       mask_fingerprint=header["mask_fingerprint"], base_fingerprint=header["base_fingerprint"],
                       dtype=header["dtype"], tensors=tensors, base_start=header["base_start"])


def _value_bytes(values: torch.Tensor) -> bytes:
    values = values.detach().reshape(-1).cpu().contiguous()
    if values.dtype in (torch.bfloat16, torch.float16):
        values = values.view(torch.int16)
    return values.numpy().tobytes()


def _values_from_bytes(raw: memoryview, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if len(raw) % size:
        raise PatchRefused(f"{len(raw)} value bytes is not a whole number of {dtype} values")
    if not len(raw):
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=_INT_VIEW.get(size, torch.int32)).view(dtype)
