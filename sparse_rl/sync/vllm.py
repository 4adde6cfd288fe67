"""Patches into vLLM: Hugging Face names to vLLM's fused parameters, and the TRL ``use_vllm=True`` hook-up.

vLLM fuses Hugging Face tensors: ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj`` and ``gate_proj``/``up_proj`` into
``gate_up_proj``. Its models' ``load_weights`` route each checkpoint tensor through ``stacked_params_mapping``
(``vllm/model_executor/models/llama.py``, ``LlamaModel.load_weights``; Qwen2/Qwen3/Mistral use the same table) to the
fused parameter's ``weight_loader`` with a shard id, which narrows the fused weight along its output dimension (dim 0)
and copies the tensor there (``vllm/model_executor/layers/linear.py``: ``QKVParallelLinear._get_shard_offset_mapping``
puts ``q`` at row 0, ``k`` at ``num_heads * head_size``, ``v`` at ``(num_heads + num_kv_heads) * head_size``;
``MergedColumnParallelLinear.weight_loader_v2`` puts shard ``i`` at ``sum(output_sizes[:i]) // tp_size``). With tensor
parallelism 1 the fused weight is therefore ``torch.cat([q, k, v])`` (``torch.cat([gate, up])``) along dim 0, so a
Hugging Face flat index ``i`` of shard ``s`` is flat index ``offset(s) + i`` of the fused parameter, ``offset(s)`` being
the number of entries of the shards before it. Row-major layout keeps every other tensor's flat indices as they are;
``VocabParallelEmbedding`` pads the vocabulary with rows *after* the real ones, which leaves them unchanged too.
:class:`FusedLayout` computes those offsets from the Hugging Face shapes (tensor parallelism 1 only).

Two receiving sides, both reusing :class:`~sparse_rl.sync.receiver.PatchReceiver`'s checks:

- **colocate** (vLLM in the trainer process): :class:`VLLMPatchReceiver` writes into
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` (where TRL's colocate ``sync_weights`` calls
  ``load_weights``);
- **server** (``trl vllm-serve`` / ``vllm serve``): :class:`SparsePatchWorkerExtension`, loaded into vLLM's workers with
  ``--worker-extension-cls sparse_rl.sync.vllm.SparsePatchWorkerExtension``, receives encoded patches through vLLM's
  dev-mode ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``, which ``trl vllm-serve`` sets;
  ``vllm/entrypoints/serve/dev/rpc/api_router.py``: string arguments only, so patches travel base64-encoded).

vLLM also has a sparse engine of its own, ``--weight-transfer-config '{"backend": "sparse_nccl"}'`` (vLLM PR #40096,
``vllm/distributed/weight_transfer/sparse_nccl_engine.py``): per tensor it broadcasts int32 flat indices and values
over the NCCL group TRL already opens and ``index_copy_``s them into the *runtime* (fused) parameter, with tensor
parallelism 1 and no checks of order, mask or base. :func:`runtime_patches` turns a patch into exactly those
``(runtime name, int32 indices, values)`` triples and :class:`SparseNCCLSink` sends them that way.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..mask import SubnetworkMask
from .fingerprint import selected_fingerprint, server_base_fingerprint
from .patch import PatchRefused, WeightPatch, dtype_from_name, encode_patch
from .producer import PatchProducer
from .receiver import AnchorNeeded, CheckedTensor, PatchReceiver

# (fused parameter, Hugging Face shard, shard id), as in vLLM's LlamaModel.load_weights
STACKED_PARAMS_MAPPING = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


@dataclass(frozen=True)
class FusedTarget:
    """Where a Hugging Face tensor lives in vLLM: the runtime parameter and the flat offset of its first entry."""

    runtime_name: str
    flat_offset: int
    numel: int


class FusedLayout:
    """Hugging Face parameter name -> vLLM runtime parameter and flat offset (tensor parallelism 1).

    Args:
        hf_shapes: shape of every Hugging Face parameter (``named_parameters()``; a model on the ``meta`` device
            gives them without memory).
        stacked_params_mapping: the model's fused-parameter table (vLLM's Llama one by default).
    """

    def __init__(self, hf_shapes: dict[str, tuple[int, ...]],
                 stacked_params_mapping: Iterable[tuple[str, str, object]] = STACKED_PARAMS_MAPPING):
        mapping = list(stacked_params_mapping)
        self.hf_shapes = {name: tuple(shape) for name, shape in hf_shapes.items()}
        self.targets: dict[str, FusedTarget] = {}
        self.runtime_shapes: dict[str, tuple[int, ...]] = {}
        fused_parts: dict[str, list[tuple[object, str]]] = {}
        for name, shape in hf_shapes.items():
            for fused, shard, shard_id in mapping:
                if shard in name:
                    runtime = name.replace(shard, fused)
                    fused_parts.setdefault(runtime, []).append((shard_id, name))
                    break
            else:
                numel = _numel(shape)
                self.targets[name] = FusedTarget(name, 0, numel)
                self.runtime_shapes[name] = tuple(shape)
        order = {}
        for fused, _, shard_id in mapping:
            order.setdefault(fused, []).append(shard_id)
        for runtime, parts in fused_parts.items():
            fused = next(f for f, _, _ in mapping if f in runtime)
            ids = order[fused]
            parts.sort(key=lambda part: ids.index(part[0]))
            if [p[0] for p in parts] != ids:
                raise ValueError(f"{runtime}: vLLM fuses shards {ids}, the model has {[p[0] for p in parts]}")
            shapes = [tuple(hf_shapes[n]) for _, n in parts]
            if any(s[1:] != shapes[0][1:] for s in shapes):
                raise ValueError(f"{runtime}: shards differ beyond dim 0 ({shapes}); cannot fuse them")
            offset = 0
            for (_, name), shape in zip(parts, shapes):
                self.targets[name] = FusedTarget(runtime, offset, _numel(shape))
                offset += _numel(shape)
            self.runtime_shapes[runtime] = (sum(s[0] for s in shapes), *shapes[0][1:])

    @classmethod
    def from_config(cls, config) -> FusedLayout:
        """Layout of a Hugging Face config's model (built on the ``meta`` device: shapes only)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls({name: tuple(p.shape) for name, p in model.named_parameters()})

    def __getitem__(self, hf_name: str) -> FusedTarget:
        try:
            return self.targets[hf_name]
        except KeyError:
            raise KeyError(f"{hf_name!r} is not a parameter of the model this layout was built for") from None

    def hf_views(self, runtime_params: dict[str, torch.Tensor]):
        """``(hf_name, view)`` pairs: each Hugging Face tensor as a view into the runtime parameters (tensors whose
        runtime parameter vLLM does not keep, such as a tied ``lm_head``, are skipped)."""
        for name, shape in self.hf_shapes.items():
            target = self[name]
            if target.runtime_name not in runtime_params:
                continue
            flat = runtime_params[target.runtime_name].data.view(-1)
            yield name, flat[target.flat_offset : target.flat_offset + target.numel].view(shape)


def runtime_patches(checked: list[CheckedTensor], layout: FusedLayout) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(runtime name, int32 flat indices, values)`` per fused parameter (several Hugging Face shards of one fused
    parameter become one patch, indices ascending): the form of vLLM's ``SparseWeightPatch``."""
    grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for tensor in checked:
        target = layout[tensor.name]
        grouped.setdefault(target.runtime_name, []).append((tensor.flat_indices + target.flat_offset, tensor.values))
    patches = []
    for runtime, parts in grouped.items():
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        order = torch.argsort(indices)
        if indices.numel() and int(indices.max()) >= 2**31:
            raise ValueError(f"{runtime}: flat index beyond int32, which vLLM's sparse engine takes")
        patches.append((runtime, indices[order].to(torch.int32), values[order]))
    return patches


class FusedPatchWriter:
    """Writes checked tensors into vLLM's runtime parameters (``index_copy_`` into a flat view, as vLLM's sparse
    engine's ``_apply_patch`` does)."""

    def __init__(self, runtime_params: dict[str, torch.Tensor], layout: FusedLayout):
        self.runtime_params, self.layout = runtime_params, layout

    @torch.no_grad()
    def __call__(self, checked: list[CheckedTensor]) -> None:
        for runtime, indices, values in runtime_patches(checked, self.layout):
            param = self.runtime_params[runtime]
            if not param.data.is_contiguous():
                raise PatchRefused(f"{runtime} is not contiguous")
            flat = param.data.view(-1)
            flat.index_copy_(0, indices.to(device=flat.device, dtype=torch.long), values.to(flat.device))


class VLLMPatchReceiver:
    """A :class:`PatchReceiver` whose writes go to a vLLM model's fused parameters.

    Args:
        runtime_model: the vLLM model (its ``named_parameters()`` are the runtime, fused names).
        mask: the training mask (Hugging Face names).
        hf_config: the Hugging Face config of the model, for :meth:`FusedLayout.from_config`; or pass ``layout``.
    """

    def __init__(self, runtime_model: torch.nn.Module, mask: SubnetworkMask, hf_config=None,
                 layout: FusedLayout | None = None):
        if layout is None:
            if hf_config is None:
                raise ValueError("pass hf_config= or layout=")
            layout = FusedLayout.from_config(hf_config)
        runtime_params = dict(runtime_model.named_parameters())
        missing = sorted({t.runtime_name for t in layout.targets.values()} - set(runtime_params))
        tied = [n for n in missing if n.endswith("lm_head.weight")]
        if sorted(set(missing) - set(tied)):
            raise ValueError(f"the vLLM model has no parameter {sorted(set(missing) - set(tied))[0]!r}; is it the "
                             "same architecture, with tensor parallelism 1?")
        for runtime, shape in layout.runtime_shapes.items():
            if runtime in runtime_params and runtime_params[runtime].shape[0] < shape[0]:
                raise ValueError(f"{runtime} has shape {tuple(runtime_params[runtime].shape)} in vLLM, the Hugging "
                                 f"Face shards need {shape}: tensor parallelism > 1 is not supported")
        dtype = next(iter(runtime_params.values())).dtype
        views = list(layout.hf_views(runtime_params))
        self.receiver = PatchReceiver(None, mask, base_fingerprint=server_base_fingerprint(views, mask, dtype),
                                      dtype=dtype, start_fingerprint=selected_fingerprint(views, mask, dtype))
        self.writer = FusedPatchWriter(runtime_params, layout)
        self.layout = layout

    def apply(self, patch) -> WeightPatch:
        return self.receiver.apply_to(patch, self.writer)


def weight_digests(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """``{name: "dtype:sha256"}`` of each tensor's bytes in row-major order: two sides hold the same weights bit for bit
    exactly when their digests are equal (used to compare a vLLM server's weights with the trainer's)."""
    import hashlib

    digests = {}
    for name, tensor in named_tensors:
        data = tensor.detach().contiguous().to("cpu").reshape(-1).view(torch.uint8)
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        digests[name] = f"{str(tensor.dtype).removeprefix('torch.')}:{digest}"
    return digests


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


# ---------------------------------------------------------------------------------------------- server side
class SparsePatchWorkerExtension:
    """vLLM worker extension (``--worker-extension-cls sparse_rl.sync.vllm.SparsePatchWorkerExtension``): methods the
    trainer calls through ``POST /collective_rpc`` (string arguments only).

    ``sparse_rl_init(mask_path)`` loads the trainer's mask file and fingerprints the base the worker holds;
    ``sparse_rl_apply(patch_base64)`` validates and applies one patch and returns ``"ok <sequence>"``,
    ``"anchor <message>"`` (the trainer answers with an anchor) or ``"refused <message>"``;
    ``sparse_rl_weight_digests()`` returns a SHA-256 per Hugging Face tensor of the weights the worker holds. Tensor
    parallelism 1. vLLM adds the class to its worker's bases (``WorkerWrapperBase.init_worker`` in
    ``vllm/v1/worker/worker_base.py``), refusing names the worker already has; hence the ``sparse_rl_`` prefix.
    """

    def _sparse_rl_model(self) -> torch.nn.Module:
        """The worker's model: ``Worker.get_model()`` (``GPUModelRunner.get_model`` unwraps a ``CUDAGraphWrapper``),
        else ``model_runner.model`` (vLLM's Worker holds its GPUModelRunner as ``model_runner``)."""
        get_model = getattr(self, "get_model", None)
        return get_model() if callable(get_model) else self.model_runner.model

    def sparse_rl_init(self, mask_path: str) -> str:
        model = self._sparse_rl_model()
        hf_config = self.model_runner.model_config.hf_config
        self._sparse_rl_receiver = VLLMPatchReceiver(model, SubnetworkMask.load(mask_path), hf_config=hf_config)
        return self._sparse_rl_receiver.receiver.base_fingerprint

    def sparse_rl_weight_digests(self) -> dict[str, str]:
        """:func:`weight_digests` of the Hugging Face tensors cut out of the worker's fused parameters (what the
        trainer's weights cast to the server dtype must equal; ``benchmarks/gpu_check.py`` compares them)."""
        layout = FusedLayout.from_config(self.model_runner.model_config.hf_config)
        return weight_digests(layout.hf_views(dict(self._sparse_rl_model().named_parameters())))

    def sparse_rl_apply(self, patch_base64: str) -> str:
        receiver = getattr(self, "_sparse_rl_receiver", None)
        if receiver is None:
            return "anchor the worker has no sparse_rl receiver yet (call sparse_rl_init)"
        try:
            patch = receiver.apply(base64.b64decode(patch_base64))
        except AnchorNeeded as refusal:
            return f"anchor {refusal}"
        except PatchRefused as refusal:
            return f"refused {refusal}"
        return f"ok {patch.sequence}"


class CollectiveRPCSink:
    """Trainer side of the worker extension: posts encoded patches to ``{base_url}/collective_rpc``."""

    def __init__(self, vllm_client, mask_path: str):
        self.client = vllm_client
        answers = self._call("sparse_rl_init", mask_path)
        if len(set(answers)) != 1:
            raise RuntimeError(f"the vLLM workers hold different bases: {answers}")

    def _call(self, method: str, *args: str) -> list:
        response = self.client.session.post(f"{self.client.base_url}/collective_rpc",
                                            json={"method": method, "args": list(args)})
        if response.status_code != 200:
            raise RuntimeError(f"{method} failed on the vLLM server ({response.status_code}): {response.text}; start "
                               "it with --worker-extension-cls sparse_rl.sync.vllm.SparsePatchWorkerExtension and "
                               "VLLM_SERVER_DEV_MODE=1")
        body = response.json()
        return body.get("results", body) if isinstance(body, dict) else body

    def __call__(self, patch: WeightPatch) -> None:
        answers = self._call("sparse_rl_apply", base64.b64encode(encode_patch(patch)).decode())
        for answer in answers:
            status, _, message = str(answer).partition(" ")
            if status == "anchor":
                raise AnchorNeeded(message)
            if status != "ok":
                raise PatchRefused(message)


class SparseNCCLSink:
    """Sends patches through vLLM's own ``sparse_nccl`` weight-transfer backend (server started with
    ``--weight-transfer-config '{"backend": "sparse_nccl"}'``), over the NCCL group TRL's ``VLLMClient`` opened.

    Follows ``SparseNCCLWeightTransferEngine.receive_weights``: the update info names every runtime parameter with its
    dtype, shape and number of entries, then each one's int32 indices and values are broadcast in that order. vLLM
    checks nothing beyond dtypes and lengths, so the sender keeps the order (patches go out one at a time, each
    awaited) and sends an anchor first; a server restarted from its checkpoint must be followed by
    ``producer.request_anchor()``.
    """

    def __init__(self, vllm_client, layout: FusedLayout, mask: SubnetworkMask, dtype: torch.dtype,
                 base_fingerprint: str):
        self.client, self.layout, self.dtype = vllm_client, layout, dtype
        self.receiver = PatchReceiver(None, mask, base_fingerprint=base_fingerprint, dtype=dtype)

    def __call__(self, patch: WeightPatch) -> None:
        _, checked = self.receiver.check(patch)  # positions -> flat indices, with the same checks as a receiver
        triples = runtime_patches(checked, self.layout)
        if not triples:
            return
        update_info = {"names": [n for n, _, _ in triples],
                       "dtype_names": [str(self.dtype).removeprefix("torch.")] * len(triples),
                       "shapes": [list(self.layout.runtime_shapes[n]) for n, _, _ in triples],
                       "num_updates_list": [int(i.numel()) for _, i, _ in triples]}
        client = self.client
        client._post(f"{client.base_url}/start_weight_update", json={})
        with ThreadPoolExecutor(max_workers=1) as executor:
            future = executor.submit(client._post, f"{client.base_url}/update_weights",
                                     json={"update_info": update_info})
            stream = torch.cuda.current_stream()
            for _, indices, values in triples:
                client.communicator.broadcast(indices.cuda(), src=0, stream=stream)
                client.communicator.broadcast(values.cuda(), src=0, stream=stream)
            future.result()
        client._post(f"{client.base_url}/finish_weight_update", json={})
        self.receiver.stream, self.receiver.sequence = patch.stream, patch.sequence


# ---------------------------------------------------------------------------------------------- TRL
def attach_to_vllm_generation(vllm_generation, producer: PatchProducer, mask: SubnetworkMask,
                              transport: str = "collective_rpc", mask_path: str | None = None):
    """Replace TRL's ``VLLMGeneration.sync_weights`` by a sparse sync (same trigger: TRL calls it when the global
    step moved). Colocate mode writes into the in-process vLLM model; server mode posts patches to the worker
    extension (``transport="collective_rpc"``, needs ``mask_path`` readable by the server) or uses vLLM's
    ``sparse_nccl`` backend (``transport="sparse_nccl"``)."""
    from .weight_sync import WeightSync

    if getattr(vllm_generation, "tensor_parallel_size", 1) != 1:
        raise ValueError("sparse weight sync to vLLM supports tensor parallelism 1 only (vllm_tensor_parallel_size=1)")
    if vllm_generation.mode == "colocate" and getattr(vllm_generation, "enable_sleep_mode", False):
        raise ValueError("vllm_enable_sleep_mode=True discards vLLM's weights (sleep level 2) before every generation, "
                         "so they must be resent whole; sparse patches only carry the selected entries. Turn sleep "
                         "mode off to use the sparse sync")
    if transport not in ("collective_rpc", "sparse_nccl"):
        raise ValueError(f"transport must be 'collective_rpc' or 'sparse_nccl', got {transport!r}")
    hf_config = vllm_generation.model.config
    dtype = dtype_from_name(producer.dtype_name)
    if vllm_generation.mode == "colocate":
        worker = vllm_generation.llm.llm_engine.model_executor.driver_worker
        get_model = getattr(worker, "get_model", None)  # Worker.get_model unwraps a CUDAGraphWrapper
        runtime_model = get_model() if callable(get_model) else worker.model_runner.model
        sink = VLLMPatchReceiver(runtime_model, mask, hf_config=hf_config).apply
    elif transport == "sparse_nccl":
        sink = SparseNCCLSink(vllm_generation.vllm_client, FusedLayout.from_config(hf_config), mask, dtype,
                              producer.base_fingerprint)
    else:
        if mask_path is None:
            raise ValueError("server mode with the worker extension needs mask_path= (the mask file, readable by the "
                             "vLLM server)")
        sink = CollectiveRPCSink(vllm_generation.vllm_client, str(mask_path))
    weight_sync = WeightSync(producer, sink)
    original = vllm_generation.sync_weights

    def sync_weights():
        if vllm_generation.accelerator.is_main_process or vllm_generation.mode == "colocate":
            weight_sync.sync()
        if vllm_generation.mode == "server" and vllm_generation.accelerator.is_main_process:
            vllm_generation.vllm_client.reset_prefix_cache()
        elif vllm_generation.mode == "colocate":
            vllm_generation.llm.reset_prefix_cache()

    vllm_generation.sync_weights = sync_weights
    weight_sync._undo.append(lambda: setattr(vllm_generation, "sync_weights", original))
    return weight_sync
