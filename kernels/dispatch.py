"""The one entry of the masked AdamW kernels: :func:`launch` checks a launch's tables and picks the backend.

Four launchers share one contract (a tensor table of raw addresses, a list of work tiles, the step's scalars; see
:mod:`.layout`): the Triton kernels with fp32 or 8-bit state (:mod:`.masked_adamw`, :mod:`.masked_adamw_8bit`, on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``), and their numba ports on CPU tensors: the general path
(:mod:`.masked_adamw_cpu`, every variant) and the AVX-512 block path (:mod:`.masked_adamw_cpu_blocks`, fp32
parameters with fp32 state, where the CPU has AVX-512). All four give bit-identical results. Backends are imported
when first used, so importing this module imports neither Triton nor numba.
"""

from __future__ import annotations

import os

import torch

from .layout import TABLE_COLUMNS, AdamWScalars, KernelVariant

BACKENDS = ("auto", "triton", "cpu")


def launch(
    tensor_table: torch.Tensor,
    tiles: torch.Tensor,
    scalars: AdamWScalars,
    variant: KernelVariant,
    *,
    qmaps: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """Step every work tile listed in ``tiles`` (int32 ``[n, 2]``: table row, tile index) of the tensors in
    ``tensor_table`` (int64 ``[rows, TABLE_COLUMNS]`` of addresses, :func:`.layout.tensor_table_row`), in one launch.

    ``scalars``: the step's hyperparameters (runtime arguments); ``variant``: what the tensors are (compile-time
    choices, :class:`.layout.KernelVariant`); ``qmaps``: with 8-bit state, the two 256-entry fp32 quantisation maps
    (:func:`.layout.quantisation_maps`) on the tables' device; ``backend``: one of :data:`BACKENDS`.
    """
    chosen = backend_for(tensor_table.device, backend)
    check_launch(tensor_table, tiles, variant, qmaps, chosen)
    if tiles.shape[0] == 0:
        return
    if chosen == "triton":
        from .triton_launch import triton_launch

        triton_launch(tensor_table, tiles, scalars, variant, qmaps).run()
        return
    from .cpu_common import launch_threads
    from .masked_adamw_cpu_blocks import block_path_available

    blocks = variant.param_dtype == torch.float32 and variant.state_bits == 32 and block_path_available()
    with launch_threads(tiles.shape[0]) as parallel:
        if blocks:
            from .masked_adamw_cpu_blocks import step_blocks

            step_blocks(tensor_table.numpy(), tiles.numpy(), scalars, compact_grad=variant.compact_grad,
                        parallel=parallel)
        else:
            from .masked_adamw_cpu import step_general

            step_general(tensor_table.numpy(), tiles.numpy(), scalars, variant, qmaps, parallel=parallel)


def backend_for(device: torch.device, backend: str = "auto") -> str:
    """``"triton"`` or ``"cpu"``: the backend that steps tensors on ``device`` for the requested ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors runs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported, or use backend='auto'")
        return "triton"
    if backend == "cpu" or device.type == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' got tensors on {device}; use backend='auto' for GPU tensors")
        return "cpu"
    if device.type == "cuda":
        return "triton"
    raise RuntimeError(f"MaskedAdamW runs on CPU and CUDA tensors, got {device}")


def check_launch(tensor_table: torch.Tensor, tiles: torch.Tensor, variant: KernelVariant,
                 qmaps: tuple[torch.Tensor, torch.Tensor] | None, backend: str) -> None:
    """Refuse tables and maps the kernels cannot read, naming what is wrong."""
    if tensor_table.dtype != torch.int64 or tensor_table.dim() != 2 or tensor_table.shape[1] != TABLE_COLUMNS:
        raise ValueError(f"tensor_table must be int64 [n, {TABLE_COLUMNS}], got {tensor_table.dtype} "
                         f"{tuple(tensor_table.shape)}")
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2:
        raise ValueError(f"tiles must be int32 [n, 2], got {tiles.dtype} {tuple(tiles.shape)}")
    if not (tensor_table.is_contiguous() and tiles.is_contiguous()):
        raise ValueError("tensor_table and tiles must be contiguous")
    if tiles.data_ptr() % 8:  # the Triton kernels read a (row, tile) pair as one 8-byte word
        raise ValueError("tiles must start at an 8-byte aligned address (a fresh tensor or whole rows of one)")
    tensors = [tensor_table, tiles, *(qmaps or ())]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"the launch's tables and maps must share a device, got {[str(t.device) for t in tensors]}")
    if backend == "cpu" and tensor_table.device.type != "cpu":
        raise ValueError("the numba path steps CPU tensors only; CUDA tensors go to the Triton kernel")
    if (qmaps is not None) != (variant.state_bits == 8):
        raise ValueError(f"{variant.state_bits}-bit state takes {'two' if variant.state_bits == 8 else 'no'} "
                         "quantisation maps")
    if qmaps is not None and (len(qmaps) != 2 or any(
            q.numel() != 256 or q.dtype != torch.float32 or not q.is_contiguous() for q in qmaps)):
        raise ValueError("quantisation maps must be two contiguous fp32 tensors of 256 entries")
