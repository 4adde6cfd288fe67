"""Update analysis: sparsity and rank per tensor, overlap against chance, precision control, mask algebra."""

import csv

import pytest
import torch

from sparse_rl.analysis import (
    analyze_update,
    layer_index,
    mask_overlap,
    matrix_kind,
    precision_control,
    update_rank,
)
from sparse_rl.discovery import random_mask
from sparse_rl.mask import SubnetworkMask, module_type
from tests.tiny import make_tiny_model


def _with_updates(model, updates):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in updates:
                param += updates[name]
    return model


def test_low_rank_update_reports_low_rank_and_sparse_update_near_full_rank():
    base = make_tiny_model(seed=0)
    generator = torch.Generator().manual_seed(0)
    low_rank_name, sparse_name = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    shape = dict(base.named_parameters())[low_rank_name].shape  # 64 x 32
    low_rank = torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, shape[1], generator=generator) * 1e-2
    sparse = torch.randn(shape, generator=generator) * 1e-2 * (torch.rand(shape, generator=generator) < 0.1)
    finetuned = _with_updates(make_tiny_model(seed=0), {low_rank_name: low_rank, sparse_name: sparse})
    report = analyze_update(base, finetuned)
    by_name = {t.name: t for t in report.tensors}
    assert by_name[low_rank_name].rank == 2 and by_name[low_rank_name].rank_ratio == 2 / 32
    assert by_name[sparse_name].rank_ratio >= 0.9
    assert by_name[sparse_name].rank == int(torch.linalg.matrix_rank(sparse))
    assert by_name["model.layers.0.self_attn.q_proj.weight"].rank == 0
    # counts agree with an independent count
    assert by_name[sparse_name].changed == int((sparse.abs() > 1e-5).sum())
    assert report.changed == int((low_rank.abs() > 1e-5).sum()) + int((sparse.abs() > 1e-5).sum())
    ratios = [t.rank_ratio for t in report.tensors if t.rank_ratio is not None]
    assert report.mean_rank_ratio == pytest.approx(sum(ratios) / len(ratios))
    assert len(ratios) == 2 * 7 + 2  # 7 matrices per block, embeddings and lm_head


def test_update_rank_tolerance_and_bad_input():
    matrix = torch.diag(torch.tensor([1.0, 1e-3, 1e-9]))
    assert update_rank(matrix) == 2  # 1e-9 is below 3 * 2^-23
    assert update_rank(matrix, rtol=1e-2) == 1
    with pytest.raises(ValueError, match="2-D"):
        update_rank(torch.ones(3))


def test_report_outputs(tmp_path):
    base = make_tiny_model(seed=0)
    finetuned = make_tiny_model(seed=0)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.view(-1)[::7] += 0.01
    report = analyze_update(base, finetuned, keep_mask=True)
    rows = list(csv.DictReader(report.write_csv(tmp_path / "u.csv").open()))
    for row, (name, param) in zip(rows, finetuned.named_parameters()):
        assert row["name"] == name and int(row["changed"]) == -(-param.numel() // 7)
    assert report.mask.num_selected == report.changed
    assert (tmp_path / "u.png").exists() is False
    png = report.plot(tmp_path / "u.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.table()
    assert "q_proj" in table and "model.embed_tokens.weight" in table
    assert f"{report.changed:,} of {report.total:,}" in table


def test_names():
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12 and layer_index("model.norm.weight") is None
    assert matrix_kind("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert matrix_kind("model.layers.3.self_attn.q_proj.bias") == "q_proj.bias"
    assert module_type("model.layers.0.post_attention_layernorm.weight") == "norms"
    assert module_type("model.layers.0.self_attn.o_proj.weight") == "attention"
    assert module_type("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_type("lm_head.weight") == "embeddings"


@pytest.mark.parametrize("d1,d2", [(0.1, 0.3), (0.05, 0.05)])
def test_random_masks_overlap_near_chance(d1, d2):
    model = make_tiny_model()
    overlap = mask_overlap(random_mask(model, d1, seed=1), random_mask(model, d2, seed=2))
    assert overlap.chance_overlap == pytest.approx(d2, rel=0.05)  # uniform per-tensor density: chance = d2
    assert overlap.chance_jaccard == pytest.approx(d1 * d2 / (d1 + d2 - d1 * d2), rel=0.05)
    # the intersection of independent masks is ~hypergeometric: within 4 standard deviations of its mean
    expected = overlap.expected_intersection
    assert abs(overlap.intersection - expected) < 4 * expected**0.5
    assert abs(overlap.overlap - overlap.chance_overlap) < 4 * expected**0.5 / overlap.selected1
    assert overlap.jaccard == pytest.approx(overlap.chance_jaccard, rel=4 / expected**0.5)


def test_identical_and_disjoint_masks():
    a = SubnetworkMask({"w": torch.tensor([True, True, False, False])})
    b = SubnetworkMask({"w": torch.tensor([False, False, True, True])})
    assert mask_overlap(a, a).jaccard == 1.0 and mask_overlap(a, a).overlap == 1.0
    assert mask_overlap(a, b).jaccard == 0.0
    assert mask_overlap(a, b).expected_intersection == pytest.approx(1.0)  # 2 * 2 / 4
    with pytest.raises(ValueError, match="shape of 'w'"):
        mask_overlap(a, SubnetworkMask({"w": torch.ones(5, dtype=torch.bool)}))


def test_mask_algebra():
    model = make_tiny_model()
    a, b = random_mask(model, 0.3, seed=1), random_mask(model, 0.2, seed=2, exclude=("mlp",))
    union, inter = a | b, a & b
    for name in a:
        other = b.selections.get(name, torch.zeros_like(a[name]))
        assert torch.equal(union[name], a[name] | other)
        assert torch.equal(inter[name], a[name] & other)
    assert union.num_selected + inter.num_selected == a.num_selected + b.num_selected
    by_type = a.density_by_module_type()
    assert set(by_type) == {"attention", "mlp", "embeddings", "norms"}
    mlp = [n for n in a if ".mlp." in n]
    assert by_type["mlp"] == pytest.approx(sum(int(a[n].sum()) for n in mlp) / sum(a[n].numel() for n in mlp))
    with pytest.raises(ValueError, match="cannot combine masks"):
        a | SubnetworkMask({"lm_head.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(TypeError):
        a & {"w": torch.ones(1, dtype=torch.bool)}


def _bf16_representable(model):
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return model


def test_precision_control_dense_small_updates_are_rounding():
    """A dense fp32 update of ~2e-5: the fp32 diff moves every entry, a bf16 diff shows only the entries with small
    |w|; shuffling the values reproduces both the sparsity and most of the overlap between two such runs."""
    base = _bf16_representable(make_tiny_model(seed=0))
    generator = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(2):
        updates = {n: torch.randn(p.shape, generator=generator) * 2e-5 for n, p in base.named_parameters()}
        runs.append(_with_updates(_bf16_representable(make_tiny_model(seed=0)), updates))
    # updates of bf16-representable weights in fp32 checkpoints: exact diff dense, bf16 diff sparse
    control = precision_control(base, runs[0], other=runs[1])
    total = sum(p.numel() for p in base.parameters())
    rounded = sum(int(((p.to(torch.bfloat16).float() - b).abs() > 1e-5).sum())
                  for p, b in zip(runs[0].parameters(), base.parameters()))
    assert control.total == total and control.changed_rounded == rounded
    assert control.sparsity_exact == pytest.approx(0.0, abs=1e-3)
    assert control.sparsity_rounded > 0.5
    assert control.rounding_sparsity_share == pytest.approx(1.0, abs=1e-2)
    assert control.null_sparsity_share == pytest.approx(1.0, abs=0.05)
    assert control.overlap.overlap > 1.5 * control.overlap.chance_overlap  # small weights change in both runs
    assert control.null_overlap_share > 0.85
    assert "null reproduces" in control.summary()


def test_precision_control_planted_shared_support_is_not_rounding():
    """Two runs that make the same large changes: the overlap is the optimiser's, the null does not reproduce it."""
    base = _bf16_representable(make_tiny_model(seed=0))
    generator = torch.Generator().manual_seed(0)
    support = {n: torch.rand(p.shape, generator=generator) < 0.05 for n, p in base.named_parameters()}
    runs = [_with_updates(_bf16_representable(make_tiny_model(seed=0)),
                          {n: 0.05 * torch.randn(s.shape, generator=generator) * s for n, s in support.items()})
            for _ in range(2)]
    control = precision_control(base, runs[0], other=runs[1])
    assert control.overlap.overlap > 0.95
    assert control.null_overlap_share < 0.3
    assert control.null_sparsity_share == pytest.approx(1.0, abs=0.01)  # same values: same count survives


def test_precision_control_of_bf16_checkpoints_and_constant_update():
    """bf16-only checkpoints have no exact diff; a constant update is the same after shuffling, so the null equals
    the measurement exactly."""
    base = make_tiny_model(seed=0).to(torch.bfloat16)
    finetuned = make_tiny_model(seed=0).to(torch.bfloat16)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.copy_((param.float() + 3e-3).to(torch.bfloat16))
    control = precision_control(base, finetuned)
    assert control.changed_exact is None and control.sparsity_exact is None
    assert control.changed_null == control.changed_rounded
    assert "not available" in control.summary()
    with pytest.raises(ValueError, match="floating-point"):
        precision_control(base, finetuned, dtype=torch.int8)
