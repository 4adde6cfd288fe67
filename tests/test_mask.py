import pytest
import torch

from sparse_rl import SparseConfig, SubnetworkMask
from sparse_rl.discovery import random_mask


def test_save_load_round_trip_exact(tmp_path, tiny_model):
    mask = random_mask(tiny_model, density=0.13, seed=3)
    mask.save(tmp_path / "mask.safetensors")
    loaded = SubnetworkMask.load(tmp_path / "mask.safetensors")
    assert loaded == mask
    assert loaded.num_selected == mask.num_selected
    for name, selection in mask.items():
        assert loaded[name].shape == selection.shape and loaded[name].dtype == torch.bool


def test_packed_file_is_one_bit_per_entry(tmp_path, tiny_model):
    mask = random_mask(tiny_model, density=0.5)
    mask.save(tmp_path / "m.safetensors")
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < mask.num_total / 8 + 20_000  # bits plus header


def test_random_mask_density_per_tensor(tiny_model):
    mask = random_mask(tiny_model, density=0.1)
    for name, param in tiny_model.named_parameters():
        expected = -(-param.numel() // 10)  # ceil
        assert int(mask[name].sum()) == expected, name
    assert 0.1 <= mask.density < 0.11


def test_random_masks_differ_by_seed(tiny_model):
    assert random_mask(tiny_model, 0.2, seed=0) != random_mask(tiny_model, 0.2, seed=1)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(tiny_model, density):
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        random_mask(tiny_model, density)
    with pytest.raises(ValueError, match="density"):
        SparseConfig(density=density)


def test_unknown_parameter_name_is_named(tiny_model):
    mask = SubnetworkMask({"model.layers.9.mlp.up_proj.weight": torch.ones(64, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        mask.check_matches(tiny_model.named_parameters())


def test_wrong_shape_is_named(tiny_model):
    mask = SubnetworkMask({"model.layers.0.mlp.up_proj.weight": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"up_proj.weight.*shape \(32, 64\).*\(64, 32\)"):
        mask.check_matches(tiny_model.named_parameters())


def test_non_bool_mask_rejected():
    with pytest.raises(TypeError, match="bool"):
        SubnetworkMask({"w": torch.ones(3)})


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a sparse_rl mask"):
        SubnetworkMask.load(tmp_path / "x.safetensors")


def test_holds_one_bit_per_entry_and_unpacks_what_it_was_given(tiny_model):
    """The mask keeps its selections packed (what a bool per entry would cost, divided by 8) and gives back the very
    selections it was built from, with their counts."""
    generator = torch.Generator().manual_seed(0)
    given = {n: torch.rand(p.shape, generator=generator) < 0.3 for n, p in tiny_model.named_parameters()}
    mask = SubnetworkMask(given)
    assert mask.nbytes == sum((s.numel() + 7) // 8 for s in given.values())
    assert mask.nbytes < sum(s.numel() for s in given.values()) / 7
    for name, selection in given.items():
        assert torch.equal(mask[name], selection) and torch.equal(mask.selections[name], selection), name
        assert mask.count(name) == int(selection.sum()) and mask.shape_of(name) == tuple(selection.shape)
    assert mask.num_selected == sum(int(s.sum()) for s in given.values())
    assert mask.per_tensor_density() == pytest.approx({n: float(s.float().mean()) for n, s in given.items()})
    assert SubnetworkMask((n, s) for n, s in given.items()) == mask  # built from pairs as they come
    assert mask == SubnetworkMask({n: s.clone() for n, s in given.items()})
    flipped = dict(given)
    name = next(iter(given))
    flipped[name] = ~given[name]
    assert SubnetworkMask(flipped) != mask


def test_is_immutable():
    mask = SubnetworkMask({"w": torch.tensor([True, False, True])})
    with pytest.raises(TypeError):
        mask.selections["w"] = torch.ones(3, dtype=torch.bool)
    mask["w"][:] = False  # a fresh unpacked copy: the mask is unchanged
    assert mask.num_selected == 2 and torch.equal(mask["w"], torch.tensor([True, False, True]))


def test_selected_indices_are_shared_while_held():
    selection = torch.zeros(1000, dtype=torch.bool)
    selection[[3, 10, 999]] = True
    mask = SubnetworkMask({"w": selection})
    held = mask.selected_indices("w")
    assert held.dtype == torch.int32 and held.tolist() == [3, 10, 999]
    assert mask.selected_indices("w") is held  # one tensor for every holder
    del held
    assert len(mask._indices) == 0  # freed with its last holder, not kept by the mask


def test_pickles_and_copies_without_its_shared_indices(tiny_model):
    import copy
    import pickle

    mask = random_mask(tiny_model, 0.2)
    held = mask.selected_indices(next(iter(mask)))
    for twin in (pickle.loads(pickle.dumps(mask)), copy.deepcopy(mask)):
        assert twin == mask and twin.num_selected == mask.num_selected
        assert torch.equal(twin.selected_indices(next(iter(mask))), held)
