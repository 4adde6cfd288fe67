"""A kill at any moment of a checkpoint save leaves a checkpoint that resumes bit-identically (issue: the mask used
to be written after transformers rotated old checkpoints out, so a kill in between left none that could resume)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from tests.checkpoint_kill_worker import KILL_POINTS
from tests.trl_cases import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _start(model_dir, output_dir, phase, weights):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.checkpoint_kill_worker", str(model_dir), str(output_dir),
                             phase, str(weights)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process, expect_kill: bool) -> None:
    output, _ = process.communicate(timeout=600)
    expected = -signal.SIGKILL if expect_kill else 0
    assert process.returncode == expected, output[-3000:]


def test_a_kill_at_any_moment_of_a_save_resumes_bit_identically(tiny_checkpoint, tmp_path):
    killed = {point: _start(tiny_checkpoint, tmp_path / point, point, tmp_path / "unused") for point in KILL_POINTS}
    full = _start(tiny_checkpoint, tmp_path / "full", "full", tmp_path / "full.safetensors")
    for process in killed.values():
        _finish(process, expect_kill=True)
    # what each kill left: an incomplete checkpoint-3 beside checkpoint-2, a complete checkpoint-3 beside
    # checkpoint-2, or (after the rotation) a complete checkpoint-3 alone, mask included
    assert not (tmp_path / "before_optimizer" / "checkpoint-3" / "trainer_state.json").exists()
    assert (tmp_path / "before_optimizer" / "checkpoint-2" / "trainer_state.json").exists()
    assert (tmp_path / "before_rotation" / "checkpoint-2").exists()
    assert (tmp_path / "on_save" / "checkpoint-3" / "sparse_mask.safetensors").exists()
    assert not (tmp_path / "on_save" / "checkpoint-2").exists()
    resumed = {point: _start(tiny_checkpoint, tmp_path / point, "resume", tmp_path / f"{point}.safetensors")
               for point in KILL_POINTS}
    _finish(full, expect_kill=False)
    for process in resumed.values():
        _finish(process, expect_kill=False)
    expected = load_file(tmp_path / "full.safetensors")
    for point in KILL_POINTS:
        found = load_file(tmp_path / f"{point}.safetensors")
        for name, value in expected.items():
            assert torch.equal(found[name], value), f"{point}: {name} differs from the uninterrupted run"


def test_an_interrupted_checkpoint_is_named_and_skipped(tiny_checkpoint, tmp_path):
    first = build_trainer("sft", tiny_checkpoint, tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)
    sparsify(first, SparseConfig(discovery="random", seed=3))
    first.train()
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").unlink()  # as if killed during the step-2 save
    second = build_trainer("sft", tiny_checkpoint, tmp_path / "run", max_steps=2)
    sparsify(second, SparseConfig(discovery="random", seed=3))
    with pytest.raises(UnsupportedTrainerSetup, match=r"checkpoint-2 is incomplete: its save was interrupted.*"
                                                      r"the last complete one there is .*checkpoint-1"):
        second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    with pytest.warns(UserWarning, match=r"checkpoint-2: its save was interrupted.*resuming from .*checkpoint-1"):
        second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 2
