"""Measurements added for the research reproduction: change share by weight magnitude, agreement of two updates,
and the precision null's update rank."""

import math

import pytest
import torch

from sparse_rl.analysis import analyze_update, magnitude_profile, precision_control, update_agreement
from sparse_rl.mask import SubnetworkMask


def _weights(**tensors) -> torch.nn.Module:
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in tensors.items()})


def _bf16_values(*shape, seed=0):
    """fp32 weights that are exact bf16 numbers (the protocol starts from bf16-rounded base weights)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 0.05).to(torch.bfloat16).float()


def test_magnitude_profile_constant_update_shows_only_small_weights():
    w = torch.linspace(1e-4, 1.0, 1000).to(torch.bfloat16).float()[torch.randperm(1000)]
    base = _weights(w=w)
    finetuned = _weights(w=w + 1e-3)  # every entry moves by the same amount
    profile = magnitude_profile(base, finetuned, bins=4)
    assert profile.total == [250, 250, 250, 250]
    assert profile.exact_share == [1.0, 1.0, 1.0, 1.0]
    # bf16 shows the move only where half an ulp of |w| is below 1e-3, i.e. |w| < 0.5 (ulp 2^-9 below 0.5)
    visible = (w + 1e-3).to(torch.bfloat16) != w.to(torch.bfloat16)
    assert bool(visible[w.abs() < 0.25].all()) and not bool(visible[w.abs() >= 0.5].any())
    order = torch.argsort(w.abs(), stable=True)
    expected = [float(visible[order[i * 250:(i + 1) * 250]].float().mean()) for i in range(4)]
    assert profile.rounded_share == pytest.approx(expected, abs=1e-6)
    assert profile.rounded_share[0] == 1.0 and profile.rounded_share[-1] == 0.0
    # a constant update is the same wherever it is placed: the null reproduces the profile exactly
    assert profile.null == profile.rounded


def test_magnitude_profile_planted_large_weight_update_is_not_reproduced_by_null():
    w = _bf16_values(40, 50)
    top = w.abs() >= w.abs().flatten().kthvalue(int(0.9 * w.numel()) + 1).values
    update = torch.where(top, torch.full_like(w, 0.05), torch.zeros_like(w))  # large moves on the largest 10% only
    profile = magnitude_profile(_weights(w=w), _weights(w=w + update), bins=10)
    assert profile.rounded_share[-1] == 1.0 and sum(profile.rounded_share[:-1]) == 0.0
    assert profile.exact_share[-1] == 1.0 and sum(profile.exact_share[:-1]) == 0.0
    # shuffled, the same values land in every bin
    assert max(profile.null_share[:-1]) > 0.03
    assert sum(profile.null) == pytest.approx(sum(profile.rounded), rel=0.05)


def test_magnitude_profile_of_bf16_checkpoints_has_no_exact_diff_and_bad_bins():
    w = _bf16_values(8, 8)
    profile = magnitude_profile(_weights(w=w.bfloat16()), _weights(w=(w + 0.1).bfloat16()), bins=2)
    assert profile.exact is None and profile.rows()[0]["changed_exact"] == ""
    with pytest.raises(ValueError, match="bins"):
        magnitude_profile(_weights(w=w), _weights(w=w), bins=0)


def test_update_agreement_against_direct_computation():
    generator = torch.Generator().manual_seed(1)
    base = {"a": _bf16_values(6, 7, seed=2), "b": _bf16_values(5, seed=3)}
    delta_ref = {k: torch.randn(v.shape, generator=generator) * 1e-2 for k, v in base.items()}
    delta_cand = {k: d + torch.randn(d.shape, generator=generator) * 5e-3 for k, d in delta_ref.items()}
    result = update_agreement(_weights(**base), _weights(**{k: base[k] + delta_cand[k] for k in base}),
                              _weights(**{k: base[k] + delta_ref[k] for k in base}))
    # reference: recompute the deltas from the stored fp32 values, flattened together
    da = torch.cat([((base[k] + delta_cand[k]).double() - base[k].double()).flatten() for k in base])
    db = torch.cat([((base[k] + delta_ref[k]).double() - base[k].double()).flatten() for k in base])
    assert result.entries == 47
    assert result.relative_error == pytest.approx(float((da - db).norm() / db.norm()), rel=1e-9)
    assert result.cosine == pytest.approx(float(torch.dot(da, db) / (da.norm() * db.norm())), rel=1e-9)


def test_update_agreement_scaled_negated_and_masked():
    w = _bf16_values(10, 10)
    d = torch.randn(10, 10, generator=torch.Generator().manual_seed(4)) * 1e-2
    base, ref = _weights(w=w), _weights(w=w + d)
    same = update_agreement(base, _weights(w=w + d), ref)
    assert same.relative_error == 0.0 and same.cosine == pytest.approx(1.0) and same.rounded_equal == 1.0
    half = update_agreement(base, _weights(w=w + d / 2), ref)
    assert half.relative_error == pytest.approx(0.5, rel=1e-5) and half.cosine == pytest.approx(1.0)
    negated = update_agreement(base, _weights(w=w - d), ref)
    assert negated.relative_error == pytest.approx(2.0, rel=1e-5) and negated.cosine == pytest.approx(-1.0)
    # candidate equals the reference on the first 3 rows only: perfect there, not overall
    selection = torch.zeros(10, 10, dtype=torch.bool)
    selection[:3] = True
    partial = _weights(w=torch.where(selection, w + d, w))
    on_mask = update_agreement(base, partial, ref, SubnetworkMask({"w": selection}))
    assert on_mask.entries == 30 and on_mask.relative_error == 0.0
    overall = update_agreement(base, partial, ref)
    assert overall.relative_error == pytest.approx(math.sqrt(float(d[3:].square().sum() / d.square().sum())), rel=1e-5)
    with pytest.raises(ValueError, match="selects no tensor"):
        update_agreement(base, partial, ref, SubnetworkMask({"other": selection}))


def test_precision_control_null_rank_of_single_entry_update():
    a, b = _bf16_values(12, 8, seed=5), _bf16_values(6, 9, seed=6)
    moved = a.clone()
    moved[3, 4] += 1.0  # one entry, far above bf16 resolution: rank 1 wherever the shuffle puts it
    base, finetuned = _weights(a=a, b=b), _weights(a=moved, b=b)
    assert precision_control(base, finetuned).null_mean_rank_ratio is None
    control = precision_control(base, finetuned, rank=True)
    expected = (1 / 8 + 0 / 6) / 2
    assert control.null_mean_rank_ratio == pytest.approx(expected)
    assert analyze_update(base, finetuned, compare_dtype=torch.bfloat16).mean_rank_ratio == pytest.approx(expected)
    assert "null model update rank" in control.summary()
