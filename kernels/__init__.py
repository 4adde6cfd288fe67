"""Masked AdamW kernels of sparse_rl, installed as ``sparse_rl.kernels`` (never as a top-level ``kernels``).

:func:`launch` is the one entry: it checks a launch's tables and runs the Triton kernel (CUDA tensors) or its numba
port (CPU tensors). The state layout and the launch tables are built with :mod:`.layout`. Nothing here imports TRL or
transformers, and importing this package loads none of the Triton or numba modules (each backend is imported at its
first launch). :mod:`.aot` compiles every Triton launch for GPU targets on a machine without a GPU.
"""

from .dispatch import BACKENDS, launch

__all__ = ["BACKENDS", "launch"]
