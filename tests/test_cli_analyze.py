"""`sparse-rl analyze` on saved tiny checkpoints: the printed figures match an independent computation."""

import csv
import re

import pytest
import torch

from benchmarks._common import perturb_share
from sparse_rl.cli import main
from sparse_rl.mask import SubnetworkMask
from tests.tiny import make_tiny_model


def _save_pair(tmp_path, shard=None):
    base = make_tiny_model(seed=0)
    finetuned = make_tiny_model(seed=0)
    perturb_share(finetuned, share=0.2, size=1e-2, seed=0)
    with torch.no_grad():
        low_rank = finetuned.model.layers[0].self_attn.q_proj.weight
        low_rank.copy_(base.model.layers[0].self_attn.q_proj.weight + torch.ones(32, 1) @ torch.ones(1, 32) * 1e-2)
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft", **({"max_shard_size": shard} if shard else {}))
    return base, finetuned


def test_analyze_prints_figures_that_match(tmp_path, capsys):
    base, finetuned = _save_pair(tmp_path, shard="20KB")
    out = tmp_path / "report"
    code = main(["analyze", str(tmp_path / "base"), str(tmp_path / "ft"), "--output-dir", str(out),
                 "--save-mask", str(tmp_path / "mask.safetensors")])
    printed = capsys.readouterr().out
    assert code == 0

    deltas = {n: (p - b).detach() for (n, p), b in zip(finetuned.named_parameters(), base.parameters())}
    changed = sum(int((d.abs() > 1e-5).sum()) for d in deltas.values())
    total = sum(d.numel() for d in deltas.values())
    assert f"entries changed (|Δ| > 1e-05): {changed:,} of {total:,} = {changed / total:.4%}" in printed
    assert f"update sparsity {1 - changed / total:.4%}" in printed
    ratios = [int(torch.linalg.matrix_rank(d)) / min(d.shape) for d in deltas.values() if d.dim() == 2]
    mean = re.search(r"mean rank\(Δ\)/min\(m, n\) over (\d+) matrices = ([\d.]+)%", printed)
    assert int(mean.group(1)) == len(ratios)
    assert abs(float(mean.group(2)) - 100 * sum(ratios) / len(ratios)) < 0.01
    # the q_proj of layer 0 got a rank-1 update: 1/32 = 3.12% in the rank table
    rank_rows = printed.split("update rank, % of full rank")[1].splitlines()
    assert rank_rows[1].split()[:2] == ["layer", "q_proj"] and rank_rows[2].split()[:2] == ["0", "3.12"]

    rows = {row["name"]: row for row in csv.DictReader((out / "update_sparsity.csv").open())}
    assert rows.keys() == deltas.keys()
    for name, delta in deltas.items():
        assert int(rows[name]["changed"]) == int((delta.abs() > 1e-5).sum()), name
    assert (out / "update_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    mask = SubnetworkMask.load(tmp_path / "mask.safetensors")
    assert mask == SubnetworkMask({n: d.abs() > 1e-5 for n, d in deltas.items()})
    assert "precision control" in printed and "exact diff (as stored, any change):" in printed


def test_analyze_with_second_run_reports_overlap(tmp_path, capsys):
    _save_pair(tmp_path)
    code = main(["analyze", str(tmp_path / "base"), str(tmp_path / "ft"), "--other", str(tmp_path / "ft"),
                 "--output-dir", str(tmp_path / "report"), "--no-rank"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "overlap |I1 ∩ I2| / |I1| = 1.0000" in printed  # a run overlaps itself entirely
    assert "update rank" not in printed


def test_analyze_bad_inputs(tmp_path, capsys):
    make_tiny_model(seed=0).save_pretrained(tmp_path / "base")
    make_tiny_model(seed=0, intermediate_size=80).save_pretrained(tmp_path / "wider")
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "wider"), "--output-dir", str(tmp_path)]) == 2
    assert "mismatched architectures" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


def test_analyze_checks_its_outputs_before_the_analysis(tmp_path, capsys, monkeypatch):
    import sparse_rl.analysis

    _save_pair(tmp_path)
    monkeypatch.setattr(sparse_rl.analysis, "analyze_update", lambda *a, **k: pytest.fail("analysis ran"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    pair = [str(tmp_path / "base"), str(tmp_path / "ft")]
    assert main(["analyze", *pair, "--output-dir", str(a_file)]) == 2
    assert f"--output-dir {a_file} is a file" in capsys.readouterr().err
    missing = tmp_path / "missing" / "mask.safetensors"
    assert main(["analyze", *pair, "--output-dir", str(tmp_path / "out"), "--save-mask", str(missing)]) == 2
    assert f"its folder {missing.parent} does not exist" in capsys.readouterr().err
    assert main(["analyze", *pair, "--output-dir", str(tmp_path / "out"), "--save-mask", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_analyze_names_a_truncated_checkpoint(tmp_path, capsys):
    _save_pair(tmp_path)
    weights = tmp_path / "ft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "ft"), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"cannot read checkpoint file {weights}" in capsys.readouterr().err
