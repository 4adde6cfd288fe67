"""SparseDelta: bit-exact save/load/merge/unmerge, a base checksum refusing other bases, plain transformers export."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from benchmarks._common import perturb_selected
from sparse_rl import SparseConfig, sparsify
from sparse_rl.checked_files import save_checked
from sparse_rl.delta import DELTA_CONFIG_NAME, DELTA_WEIGHTS_NAME, SparseDelta, base_checksum
from sparse_rl.discovery import random_mask
from tests.tiny import make_tiny_model
from tests.trl_cases import build_trainer


def _assert_same_weights(model, other):
    others = dict(other.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, others[name]), f"{name} differs"


def _differs_somewhere(model, other):
    others = dict(other.named_parameters())
    return any(not torch.equal(p, others[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density,encoding", [(0.01, ".mask_indices"), (0.2, ".mask_bits")])
def test_save_load_merge_is_bit_exact(tmp_path, dtype, density, encoding):
    base = make_tiny_model().to(dtype)
    mask = random_mask(base, density)
    trained = perturb_selected(copy.deepcopy(base), mask)
    assert _differs_somewhere(trained, base)

    SparseDelta.from_trained(trained, mask, base_model_name_or_path="tiny-base").save_pretrained(tmp_path / "delta")
    loaded = SparseDelta.load(tmp_path / "delta")
    assert loaded.mask == mask
    for name, values in loaded.selected_values.items():
        assert values.dtype == dtype
        expected = trained.get_parameter(name).detach().reshape(-1)[mask.flat_indices(name)]
        assert torch.equal(values, expected)
    with safe_open(str(tmp_path / "delta" / DELTA_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    for name, selection in mask.items():  # the smaller of int32 indices and packed bits, per tensor
        smaller = ".mask_indices" if 4 * int(selection.sum()) < (selection.numel() + 7) // 8 else ".mask_bits"
        assert name + smaller in keys
    assert any(k.endswith(encoding) for k in keys)

    target = copy.deepcopy(base)
    SparseDelta.from_pretrained(target, tmp_path / "delta")
    _assert_same_weights(target, trained)


def test_delta_of_a_sparsified_grpo_run_rebuilds_the_trained_model(tiny_checkpoint, tmp_path):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / "out", learning_rate=5e-2)
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.1))
    trainer.train()
    delta = SparseDelta.from_trained(trainer.model, sparse.mask)
    assert delta.config.base_model_name_or_path == str(tiny_checkpoint)
    delta.save_pretrained(tmp_path / "delta")

    base = AutoModelForCausalLM.from_pretrained(delta.config.base_model_name_or_path)
    assert _differs_somewhere(base, trainer.model)
    SparseDelta.from_pretrained(base, tmp_path / "delta")
    _assert_same_weights(base, trainer.model)


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_exports_as_plain_transformers_checkpoint(tmp_path, tied):
    base = make_tiny_model(tie_word_embeddings=tied)
    mask = random_mask(base, 0.1)
    trained = perturb_selected(copy.deepcopy(base), mask)
    SparseDelta.from_trained(trained, mask).save_pretrained(tmp_path / "delta")
    target = copy.deepcopy(base)
    SparseDelta.from_pretrained(target, tmp_path / "delta")
    target.save_pretrained(tmp_path / "merged")
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), trained)


def test_unmerge_restores_the_base_bit_exactly(tmp_path):
    base = make_tiny_model()
    mask = random_mask(base, 0.3)
    trained = perturb_selected(copy.deepcopy(base), mask)
    SparseDelta.from_trained(trained, mask).save_pretrained(tmp_path / "delta")
    target = copy.deepcopy(base)
    delta = SparseDelta.from_pretrained(target, tmp_path / "delta")
    with pytest.raises(RuntimeError, match="already merged"):
        delta.merge(target)
    delta.unmerge(target)
    _assert_same_weights(target, base)
    with pytest.raises(RuntimeError, match="not merged"):
        delta.unmerge(target)
    delta.merge(target)  # and back again
    _assert_same_weights(target, trained)

    lean = SparseDelta.from_pretrained(copy.deepcopy(base), tmp_path / "delta", keep_base_values=False)
    assert lean._base_values is None
    with pytest.raises(RuntimeError, match="not merged"):
        lean.unmerge(target)


def test_loading_onto_a_different_base_is_refused(tmp_path):
    base = make_tiny_model(seed=0)
    mask = random_mask(base, 0.1)
    SparseDelta.from_trained(perturb_selected(copy.deepcopy(base), mask), mask,
                             base_model_name_or_path="tiny-seed-0").save_pretrained(tmp_path / "delta")

    other = make_tiny_model(seed=1)
    before = copy.deepcopy(other)
    with pytest.raises(ValueError, match="not the base the delta was trained on.*tiny-seed-0"):
        SparseDelta.from_pretrained(other, tmp_path / "delta")
    _assert_same_weights(other, before)  # refused before touching anything

    # one unselected entry changed is enough to refuse ...
    name = "model.layers.0.self_attn.q_proj.weight"
    position = int((~mask[name].reshape(-1)).nonzero()[0])
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.get_parameter(name).view(-1)[position] += 1e-6
    with pytest.raises(ValueError, match="not the base"):
        SparseDelta.from_pretrained(nudged, tmp_path / "delta")

    # ... while a change at a selected entry is overwritten by the delta, so that base is accepted
    position = int(mask[name].reshape(-1).nonzero()[0])
    overwritten = copy.deepcopy(base)
    with torch.no_grad():
        overwritten.get_parameter(name).view(-1)[position] += 1.0
    SparseDelta.from_pretrained(overwritten, tmp_path / "delta")


def test_loading_in_another_dtype_names_the_tensor(tmp_path):
    base = make_tiny_model()
    mask = random_mask(base, 0.1)
    SparseDelta.from_trained(base, mask).save_pretrained(tmp_path / "delta")
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' is torch\.bfloat16 .* torch\.float32"):
        SparseDelta.from_pretrained(make_tiny_model().to(torch.bfloat16), tmp_path / "delta")


def test_loading_onto_another_architecture_names_the_parameter(tmp_path):
    base = make_tiny_model()
    mask = random_mask(base, 0.1)
    SparseDelta.from_trained(base, mask).save_pretrained(tmp_path / "delta")
    with pytest.raises(ValueError, match="shape"):
        SparseDelta.from_pretrained(make_tiny_model(intermediate_size=48), tmp_path / "delta")


def test_config_json_explains_the_folder(tmp_path):
    base = make_tiny_model()
    mask = random_mask(base, 0.1)
    delta = SparseDelta.from_trained(perturb_selected(copy.deepcopy(base), mask), mask, base_model_name_or_path="b")
    delta.save_pretrained(tmp_path / "delta")
    config = json.loads((tmp_path / "delta" / DELTA_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "b"
    assert config["base_checksum"] == base_checksum(base, mask)
    assert config["num_selected"] == mask.num_selected
    assert config["num_parameters"] == sum(p.numel() for p in base.parameters())
    assert config["density"] == pytest.approx(mask.num_selected / config["num_parameters"])
    assert "unselected" in config["checksum_method"]


def test_folder_size_is_values_plus_mask(tmp_path):
    base = make_tiny_model()
    mask = random_mask(base, 0.3)
    SparseDelta.from_trained(base, mask).save_pretrained(tmp_path / "delta")
    size = (tmp_path / "delta" / DELTA_WEIGHTS_NAME).stat().st_size
    payload = 4 * mask.num_selected + sum((s.numel() + 7) // 8 for s in mask.selections.values())
    assert payload <= size <= payload + 8192  # plus the safetensors header


def test_corrupted_indices_are_refused(tmp_path):
    from safetensors.torch import load_file

    base = make_tiny_model()
    mask = random_mask(base, 0.01)
    SparseDelta.from_trained(base, mask).save_pretrained(tmp_path / "delta")
    path = tmp_path / "delta" / DELTA_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".mask_indices") and tensors[k].numel() > 1)
    tensors[key] = tensors[key].flip(0).contiguous()
    metadata.pop("sha256")  # a file with a valid checksum over bad indices: the index check itself must refuse it
    save_checked(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="not sorted"):
        SparseDelta.load(tmp_path / "delta")


def test_not_a_delta_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=DELTA_CONFIG_NAME):
        SparseDelta.load(tmp_path)


@pytest.mark.parametrize("base_kind", ["module", "folder", "name_or_path"])
def test_from_trained_refuses_changes_outside_the_mask(base_kind, tmp_path):
    from transformers import AutoModelForCausalLM as Auto

    base = make_tiny_model()
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    trained = Auto.from_pretrained(folder)
    mask = random_mask(trained, 0.2, seed=1)
    name, param = next((n, p) for n, p in trained.named_parameters() if n.endswith("q_proj.weight"))
    with torch.no_grad():
        param.view(-1)[mask[name].view(-1)] += 1.0  # inside the mask: fine
    kwargs = {"module": dict(base=base), "folder": dict(base=str(folder)), "name_or_path": {}}[base_kind]
    SparseDelta.from_trained(trained, mask, **kwargs)
    outside = (~mask[name]).view(-1).nonzero()[:3, 0]
    with torch.no_grad():
        param.view(-1)[outside] += 1.0
    with pytest.raises(ValueError, match=f"outside the mask in 3 entries of 1 tensor.*{name}"):
        SparseDelta.from_trained(trained, mask, **kwargs)
