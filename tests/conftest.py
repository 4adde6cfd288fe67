"""Shared fixtures: tiny Llama models built from a config and a word-level tokenizer, all offline on CPU."""

import os

# Must be set before any @triton.jit decorates a kernel, and before transformers looks for a hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Folder with a tiny model + tokenizer saved with save_pretrained (TRL rebuilds reference models from it)."""
    return save_tiny_checkpoint(tmp_path / "tiny-llama")
