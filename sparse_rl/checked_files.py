"""Safetensors files that sparse_rl writes, with a checksum per tensor and errors that name the file.

A mask or a delta that loads with one flipped bit trains or merges the wrong entries without any sign, so every
file sparse_rl writes carries, in its header metadata, one SHA-256 over its tensors' names and bytes (``sha256``
key, over the other metadata and the tensors; one digest per file keeps the header small), and every read checks it
before returning anything. A flipped bit in the header's structure breaks its JSON or the offsets, which is an error
too.

Files are written to a temporary name in the same folder and renamed into place, so a reader (or a resume after a
kill) sees either the old file or the complete new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CHECKSUM_KEY = "sha256"


class CorruptFileError(ValueError):
    """A file sparse_rl wrote does not read back as written (truncated, a flipped bit, a header that disagrees with
    its payload)."""


def payload_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (but the checksum itself) and the tensors in name order: each name, then its raw
    bytes (a damaged dtype or shape in the header changes the bytes read or fails to parse)."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY},
                                       sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checked(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` plus per-tensor checksums in the metadata, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata={**metadata, CHECKSUM_KEY: payload_sha256(tensors, metadata)})
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checked(path: str | os.PathLike, expected_format: str, what: str,
                 legacy_format: str | None = None) -> tuple[dict[str, str], dict]:
    """Read every tensor of a file written by :func:`save_checked` and check it.

    Returns ``(metadata, tensors)``. A file in ``legacy_format`` (written before files carried checksums) is read
    without the checksum test. Raises ``FileNotFoundError``/``IsADirectoryError`` for a wrong path and
    :class:`CorruptFileError` naming ``path`` for anything that does not read back as written. ``what`` names the
    kind of file in messages ("mask file", "delta weights").
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a {what}; pass the .safetensors file inside it")
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in (expected_format, legacy_format) or metadata.get("format") is None:
                raise CorruptFileError(f"{path} is not a sparse_rl {what} (format={metadata.get('format')!r}, "
                                       f"expected {expected_format!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CorruptFileError:
        raise
    except Exception as error:  # safetensors' own errors do not name the file
        raise CorruptFileError(f"cannot read {what} {path}: {error} (the file is truncated or damaged)") from error
    if legacy_format is not None and metadata.get("format") == legacy_format:
        return metadata, tensors
    if CHECKSUM_KEY not in metadata:
        raise CorruptFileError(f"{what} {path} has no '{CHECKSUM_KEY}' metadata: it was not written by this version "
                               "of sparse_rl, or its header was damaged")
    if payload_sha256(tensors, metadata) != metadata[CHECKSUM_KEY]:
        raise CorruptFileError(f"{what} {path} does not match its checksum (the file is damaged); restore it from a "
                               "copy or write it again")
    return metadata, tensors


def metadata_json(metadata: dict[str, str], key: str, path: str | os.PathLike, what: str):
    """``json.loads(metadata[key])`` with an error naming the file when the key is missing or damaged."""
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise CorruptFileError(f"{what} {path} has no '{key}' metadata") from None
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{what} {path}: its '{key}' metadata is damaged ({error})") from None
