"""A pure-PyTorch stand-in for vLLM's side of the weight sync, for machines without vLLM (it needs CUDA).

Used by ``tests/test_weight_sync_vllm.py`` and by the dry run of ``benchmarks/gpu_check.py`` (which loads this file by
path, so it imports nothing from ``tests``). Written from vLLM's loaders, independently of
``sparse_rl.sync.vllm.FusedLayout``, for tensor parallelism 1:

- ``qkv_proj`` = ``torch.cat([q_proj, k_proj, v_proj])`` along dim 0 (``QKVParallelLinear``: q at row 0, k at
  ``num_heads * head_size``, v at ``(num_heads + num_kv_heads) * head_size``), biases likewise;
- ``gate_up_proj`` = ``torch.cat([gate_proj, up_proj])`` (``MergedColumnParallelLinear``, shard i at
  ``sum(output_sizes[:i])``);
- ``embed_tokens`` padded with zero rows to a multiple of 64 (``VocabParallelEmbedding``'s ``pad_vocab_size``);
- every other tensor as it is; a tied ``lm_head`` is not a separate parameter.

:class:`EmulatedVLLMModel` adds ``load_weights`` (what TRL's colocate ``sync_weights`` calls with Hugging Face names,
``LlamaModel.load_weights`` with its ``stacked_params_mapping``) and :class:`FakeLLM` stands in for ``vllm.LLM`` in
colocate mode: the attribute path TRL writes through (``llm_engine.model_executor.driver_worker.model_runner.model``),
``apply_model``, ``generate`` (greedy, by a Hugging Face model rebuilt from the runtime parameters) and
``reset_prefix_cache``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

PADDING = 64
_SHARDS = {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
           ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


def emulated_runtime_tensors(hf_model, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The runtime (fused) parameters vLLM would hold for ``hf_model``'s weights in ``dtype``."""
    hf = {name: p.detach().to(dtype) for name, p in hf_model.named_parameters()}
    runtime = {}
    for name, tensor in hf.items():
        if ".q_proj." in name:
            runtime[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(
                [tensor, hf[name.replace(".q_proj.", ".k_proj.")], hf[name.replace(".q_proj.", ".v_proj.")]])
        elif ".gate_proj." in name:
            runtime[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat(
                [tensor, hf[name.replace(".gate_proj.", ".up_proj.")]])
        elif any(part in name for part in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue
        elif "embed_tokens" in name:
            rows = -(-tensor.shape[0] // PADDING) * PADDING
            runtime[name] = torch.cat([tensor, torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=dtype)])
        else:
            runtime[name] = tensor.clone()
    return runtime


def as_module(tensors: dict[str, torch.Tensor], root: torch.nn.Module | None = None) -> torch.nn.Module:
    """A module whose ``named_parameters()`` are ``tensors`` (frozen), under the same dotted names."""
    root = torch.nn.Module() if root is None else root
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.register_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def _shard_rows(config) -> dict[str, list[int]]:
    """Rows of each shard of the fused parameters, from the config (as vLLM's layers compute them)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {".qkv_proj.": [config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim,
                           config.num_key_value_heads * head_dim],
            ".gate_up_proj.": [config.intermediate_size, config.intermediate_size]}


class EmulatedVLLMModel(torch.nn.Module):
    """vLLM's runtime model of a Llama-style Hugging Face model: fused parameters plus ``load_weights``."""

    def __init__(self, hf_model, dtype=torch.bfloat16):
        super().__init__()
        self.config = hf_model.config
        as_module(emulated_runtime_tensors(hf_model, dtype), root=self)

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        """Copy Hugging Face tensors in: a shard goes to rows ``sum(rows of the shards before it)`` of its fused
        parameter, the embedding to its first rows, anything else whole (cast to the parameter's dtype)."""
        params = dict(self.named_parameters())
        rows = _shard_rows(self.config)
        loaded = set()
        for name, tensor in weights:
            for shard, (fused, index) in _SHARDS.items():
                if shard in name:
                    target = name.replace(shard, fused)
                    start = sum(rows[fused][:index])
                    params[target].data[start : start + rows[fused][index]].copy_(tensor)
                    break
            else:
                if name not in params:  # a tied lm_head: vLLM skips it
                    continue
                target = name
                params[target].data[: tensor.shape[0]].copy_(tensor)
            loaded.add(target)
        return loaded

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors, cut back out of the fused parameters (the embedding's padding dropped)."""
        rows = _shard_rows(self.config)
        names = {".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."), ".gate_up_proj.": (".gate_proj.", ".up_proj.")}
        state = {}
        for name, param in self.named_parameters():
            for fused, shards in names.items():
                if fused in name:
                    for shard, piece in zip(shards, param.detach().split(rows[fused])):
                        state[name.replace(fused, shard)] = piece
                    break
            else:
                state[name] = param.detach()[: self.config.vocab_size] if "embed_tokens" in name else param.detach()
        return state


def greedy_tokens(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """``max_new_tokens`` greedy tokens (argmax, end-of-sequence not special), the whole sequence run every step."""
    device = next(hf_model.parameters()).device
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = hf_model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


class FakeLLM:
    """Stands in for ``vllm.LLM`` (colocate mode) where vLLM is not installed; see the module docstring."""

    def __init__(self, hf_model, dtype=torch.bfloat16):
        self.model = EmulatedVLLMModel(hf_model, dtype)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=self.model))))
        self.prefix_cache_resets = 0

    def apply_model(self, func):
        return [func(self.model)]  # one worker

    def generate(self, prompts, sampling_params, use_tqdm=False):
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_config(self.model.config).to(next(self.model.parameters()).dtype)
        missing, unexpected = hf_model.load_state_dict(self.model.hf_state_dict(), strict=False)
        if unexpected or any(not name.startswith("lm_head.") for name in missing):
            raise RuntimeError(f"runtime parameters do not rebuild the model: {missing=} {unexpected=}")
        hf_model.eval()
        outputs = []
        for prompt in prompts:
            tokens = greedy_tokens(hf_model, prompt["prompt_token_ids"], sampling_params.max_tokens)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)]))
        return outputs

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
