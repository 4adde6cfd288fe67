"""Restrict gradients to the subnetwork, during backward, so everything downstream sees only the selected entries.

- :mod:`.gradients`: :func:`restrict_gradients`, the entry point: a masking hook per partly selected parameter,
  ``requires_grad=False`` for parameters with nothing selected.
- :mod:`.compact`: compact gradients (only the selected entries kept, the dense ``.grad`` freed during backward) and
  the clipping that reads them.
- :mod:`.sharded`: the same on FSDP2's sharded (DTensor) parameters, and how a mask is cut to a rank's shard.
"""

from .compact import clip_grad_norm_, compact_grad_of, zero_compact_grads
from .gradients import GradientRestriction, restrict_gradients
from .sharded import restrict_sharded_gradients

__all__ = [
    "GradientRestriction",
    "clip_grad_norm_",
    "compact_grad_of",
    "restrict_gradients",
    "restrict_sharded_gradients",
    "zero_compact_grads",
]
