"""The inventory of private TRL/transformers/accelerate pieces sparse_rl relies on, and sparsify's up-front check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl._compat import PROBED_TRAINER_ATTRIBUTES, TESTED_VERSIONS, Use, has_fused_lm_head, missing_pieces
from sparse_rl.discovery import probe_trainer_state
from sparse_rl.trl import IncompatibleLibraryVersion
from tests.test_trl_refusals import _assert_same, _fingerprint
from tests.trl_cases import TRAINERS, build_trainer

EVERY_USE = Use(probe=True, entropy=True, shared_reference=True)


@pytest.mark.parametrize("name", TRAINERS)
def test_installed_libraries_have_every_piece(name, tiny_checkpoint, tmp_path):
    """No false alarm: with the tested versions every reliance a trainer could need is there."""
    trainer = build_trainer(name, tiny_checkpoint, tmp_path)
    assert missing_pieces(trainer, EVERY_USE) == []


def _delete_online_dpo_forward(trainer, monkeypatch):
    from trl.experimental.online_dpo import OnlineDPOTrainer

    monkeypatch.delattr(OnlineDPOTrainer, "_forward")


@pytest.mark.parametrize("name,delete,config,piece", [
    # a TRL class method the entropy restriction wraps
    ("online_dpo", _delete_online_dpo_forward, SparseConfig(discovery="random", entropy_quantile=0.2),
     "OnlineDPOTrainer._forward"),
    # TRL trainer state the gradient probe restores (a rename would leave it mutated by the probe)
    ("grpo", lambda trainer, monkeypatch: monkeypatch.delattr(trainer, "_buffered_inputs"),
     SparseConfig(discovery="gradient", probe={"steps": 1}), "missing: _buffered_inputs"),
    # a transformers Trainer method the resume check wraps
    ("sft", lambda trainer, monkeypatch: monkeypatch.delattr(transformers.Trainer, "_load_optimizer_and_scheduler"),
     SparseConfig(discovery="random"), "Trainer._load_optimizer_and_scheduler"),
])
def test_sparsify_refuses_when_a_private_piece_is_gone(name, delete, config, piece, tiny_checkpoint, tmp_path,
                                                        monkeypatch):
    trainer = build_trainer(name, tiny_checkpoint, tmp_path)
    before = _fingerprint(trainer)
    delete(trainer, monkeypatch)
    with pytest.raises(IncompatibleLibraryVersion) as refusal:
        sparsify(trainer, config)
    message = str(refusal.value)
    assert isinstance(refusal.value, UnsupportedTrainerSetup)
    assert piece in message
    assert f"trl{TESTED_VERSIONS['trl']}" in message and f"transformers{TESTED_VERSIONS['transformers']}" in message
    assert f"trl {__import__('trl').__version__}" in message  # the installed version is named too
    _assert_same(before, _fingerprint(trainer))
    monkeypatch.undo()
    sparsify(trainer, config)  # the same setup is accepted once the piece is back


def test_entropy_restriction_checks_the_fused_forward_shape(tiny_checkpoint, tmp_path, monkeypatch):
    """The fused LM-head detection reads add_fused_lm_head's forward signature; a renamed keyword is a compat error,
    not a misleading 'this trainer does not use the fused forward'."""
    import trl.trainer.utils

    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path)
    assert has_fused_lm_head(trainer.model)

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        def _fused_forward(self, *args, lm_head_fusion=False, **kwargs):
            return None

    monkeypatch.setattr(trl.trainer.utils, "add_fused_lm_head", add_fused_lm_head)
    with pytest.raises(IncompatibleLibraryVersion, match="add_fused_lm_head's forward taking fused_lm_head="):
        sparsify(trainer, SparseConfig(discovery="random", entropy_quantile=0.2))
    assert missing_pieces(trainer, Use(entropy=False)) == []  # only the entropy restriction needs it


def test_probe_restores_every_listed_attribute(tiny_checkpoint, tmp_path):
    """probe_trainer_state takes its list from _compat, so what the compat check guards is what the probe restores."""
    assert probe_trainer_state._ATTRS == PROBED_TRAINER_ATTRIBUTES
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path)
    before = {a: getattr(trainer, a) for a in PROBED_TRAINER_ATTRIBUTES}
    with probe_trainer_state(trainer):
        for attribute in PROBED_TRAINER_ATTRIBUTES:
            setattr(trainer, attribute, "changed by the probe")
    assert {a: getattr(trainer, a) for a in PROBED_TRAINER_ATTRIBUTES} == before


def test_tested_versions_match_pyproject():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    declared = dict(re.findall(r'^\s*"(trl|transformers)([^";]*)",', pyproject, re.M))
    assert {name: declared[name] for name in ("trl", "transformers")} == {
        name: TESTED_VERSIONS[name] for name in ("trl", "transformers")}

