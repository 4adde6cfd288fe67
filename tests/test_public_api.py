"""``import sparse_rl``: seven public names, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sparse_rl

PUBLIC = {"sparsify", "SparseConfig", "SparseTraining", "SubnetworkMask", "MaskedAdamW", "SparseDelta",
          "UnsupportedTrainerSetup"}


def test_public_names():
    assert set(sparse_rl.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(sparse_rl, name).__name__ == name
    assert PUBLIC <= set(dir(sparse_rl))
    with pytest.raises(AttributeError, match="has no attribute 'random_mask'"):
        sparse_rl.random_mask  # noqa: B018  (discovery functions live in sparse_rl.discovery)


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_masked_adamw_does_not_import_trl():
    loaded = _modules_after("from sparse_rl import MaskedAdamW, SparseConfig, SubnetworkMask")
    assert "sparse_rl" in loaded
    assert not {"trl", "transformers", "accelerate"} & loaded


def test_sparsify_imports_transformers():
    """The contrast that shows the check above can fail: the TRL integration needs transformers' Trainer."""
    assert "transformers" in _modules_after("from sparse_rl import sparsify")
