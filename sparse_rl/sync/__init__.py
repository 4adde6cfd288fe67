"""Ship stage: send the trained subnetwork to the generation server as sparse patches after optimizer steps.

    sync = attach_weight_sync(trainer, sparse, WeightSyncConfig(server_dtype="bfloat16"), sink)

- :mod:`.patch`: the patch (HF names, positions relative to the mask, absolute values in the server dtype) and its
  checksummed wire format;
- :mod:`.producer`: the trainer side (keeps only the last-sent values of the selected entries);
- :mod:`.receiver`: validates a whole patch, then writes it in place;
- :mod:`.transport` / :mod:`.serve`: two processes over ``torch.distributed``;
- :mod:`.vllm`: Hugging Face names to vLLM's fused parameters, and the TRL ``use_vllm=True`` hook-up.
"""

from .patch import PatchRefused, TensorPatch, WeightPatch, decode_patch, encode_patch
from .producer import PatchProducer
from .receiver import AnchorNeeded, PatchReceiver
from .transport import DistributedPatchSink, serve, weights_digest
from .weight_sync import WeightSync, WeightSyncCallback, WeightSyncConfig, attach_weight_sync

__all__ = [
    "AnchorNeeded",
    "DistributedPatchSink",
    "PatchProducer",
    "PatchReceiver",
    "PatchRefused",
    "TensorPatch",
    "WeightPatch",
    "WeightSync",
    "WeightSyncCallback",
    "WeightSyncConfig",
    "attach_weight_sync",
    "decode_patch",
    "encode_patch",
    "serve",
    "weights_digest",
]
