"""Files sparse_rl writes (masks, deltas) refuse to load after any one-bit corruption, with errors naming the file."""

import json

import pytest
import torch

from sparse_rl.checked_files import CorruptFileError, save_checked
from sparse_rl.delta import DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME, SparseDelta
from sparse_rl.mask import MASK_FORMAT, SubnetworkMask


def _small_mask() -> SubnetworkMask:
    g = torch.Generator().manual_seed(0)
    return SubnetworkMask({"a.weight": torch.rand(3, 5, generator=g) < 0.4, "b.bias": torch.rand(7, generator=g) < 0.5})


def _flip_bit(path, bit: int) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(damaged))
    return original


def test_every_single_bit_flip_of_a_mask_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    _small_mask().save(path)
    for bit in range(8 * path.stat().st_size):
        original = _flip_bit(path, bit)
        try:
            with pytest.raises(Exception) as error:  # noqa: B017 - which error depends on where the bit lands
                SubnetworkMask.load(path)
            assert str(path) in str(error.value), (bit, error.value)
        finally:
            path.write_bytes(original)
    assert SubnetworkMask.load(path) == _small_mask()


def test_every_single_bit_flip_of_a_delta_folder_is_refused_naming_the_file(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    mask = SubnetworkMask({"0.weight": torch.tensor([[True, False, True], [False, False, True]]),
                           "0.bias": torch.tensor([False, True])})
    folder = tmp_path / "delta"
    SparseDelta.from_trained(model, mask, base_model_name_or_path="tiny").save_pretrained(folder)
    for file in (folder / DELTA_WEIGHTS_NAME, folder / DELTA_CONFIG_NAME):
        for bit in range(0, 8 * file.stat().st_size, 3):  # every byte, at every bit position across neighbours
            original = _flip_bit(file, bit)
            try:
                with pytest.raises(Exception) as error:  # noqa: B017
                    SparseDelta.load(folder)
                assert str(folder) in str(error.value), (file.name, bit, error.value)
            finally:
                file.write_bytes(original)
    assert SparseDelta.load(folder).mask == mask


def test_mask_header_shapes_that_disagree_with_the_payload_are_refused(tmp_path):
    path = tmp_path / "mask.safetensors"
    packed = {"w": torch.tensor([0b10100000], dtype=torch.uint8)}  # 8 bits of payload
    for shape in ([4, 4], [2]):  # 16 bits would be zero-padded, 2 bits trimmed
        save_checked(packed, path, metadata={"format": MASK_FORMAT, "shapes": json.dumps({"w": shape})})
        with pytest.raises(CorruptFileError, match=f"{path}.*'w' has shape"):
            SubnetworkMask.load(path)
    save_checked(packed, path, metadata={"format": MASK_FORMAT, "shapes": json.dumps({"w": [8]})})
    assert SubnetworkMask.load(path)["w"].tolist() == [True, False, True, False, False, False, False, False]


def test_mask_load_errors_name_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder, not a mask file"):
        SubnetworkMask.load(tmp_path)
    path = tmp_path / "no_shapes.safetensors"
    save_checked({"w": torch.zeros(1, dtype=torch.uint8)}, path, metadata={"format": MASK_FORMAT})
    with pytest.raises(CorruptFileError, match=f"{path} has no 'shapes' metadata"):
        SubnetworkMask.load(path)
    truncated = tmp_path / "truncated.safetensors"
    _small_mask().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(CorruptFileError, match=f"cannot read mask file {truncated}"):
        SubnetworkMask.load(truncated)


def test_legacy_mask_files_without_checksums_still_load(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    mask = _small_mask()
    packed = {n: torch.from_numpy(np.packbits(v.reshape(-1).numpy())) for n, v in mask.items()}
    path = tmp_path / "v1.safetensors"
    save_file(packed, str(path), metadata={"format": "sparse_rl.mask.v1",
                                           "shapes": json.dumps({n: list(v.shape) for n, v in mask.items()})})
    assert SubnetworkMask.load(path) == mask


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    _small_mask().save(path)
    _small_mask().save(path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors"]
