"""The one launch of a Triton masked AdamW kernel, as data: which kernel, its arguments, grid and compile options.

:func:`triton_launch` builds it from the launch's tables; :meth:`TritonLaunch.run` launches it (on a GPU, or under
``TRITON_INTERPRET=1``), and :mod:`.aot` compiles the very same launch ahead of time for GPU targets without a GPU,
so what the compile check inspects is what the optimizer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import BLOCKS_PER_TILE, PARAM_KINDS, QUANT_BLOCK, TABLE_COLUMNS, TILE, AdamWScalars, KernelVariant

# Warps per program: one tile of TILE = 1024 entries is 2 entries per thread on NVIDIA, 1 per lane on AMD's 64-wide
# wavefronts (1024 lanes, AMD's largest workgroup). Few entries per thread keep every variant at or under 64 registers
# per thread on sm_80/sm_90 (half the SM's warp slots occupiable) and free of stack use around the calls to the
# correctly rounded division/sqrt; with 8 warps (4 entries per thread) the 8-bit kernel needed up to 80 registers and
# two fp32-state variants kept a register on the stack. tests/test_kernels_compile.py checks every variant and target.
NUM_WARPS = 16


@dataclass(frozen=True)
class TritonLaunch:
    kernel: object  # a @triton.jit function (an interpreted one under TRITON_INTERPRET=1)
    arguments: tuple  # runtime arguments, in the kernel's order
    constexprs: dict
    grid: tuple[int, ...]
    num_warps: int
    # No FMA contraction: every backend performs the same correctly rounded fp32 operations (bit-identical results).
    options: dict = field(default_factory=lambda: {"enable_fp_fusion": False})

    def run(self) -> None:
        self.kernel[self.grid](*self.arguments, **self.constexprs, num_warps=self.num_warps, **self.options)


def triton_launch(
    tensor_table: torch.Tensor,
    tiles: torch.Tensor,
    scalars: AdamWScalars,
    variant: KernelVariant,
    qmaps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TritonLaunch:
    """The launch stepping every tile listed in ``tiles`` of the tensors in ``tensor_table``: the fp32-state kernel,
    or the 8-bit one. Arguments as in :func:`sparse_rl.kernels.dispatch.launch`, which checks them."""
    runtime_scalars = (
        scalars.beta1, scalars.beta2, scalars.one_minus_beta1, scalars.one_minus_beta2, scalars.decay,
        scalars.step_size, scalars.bias_correction2_sqrt, scalars.eps, scalars.seed,
    )
    constexprs = dict(PARAM_KIND=PARAM_KINDS[variant.param_dtype], HAS_MASTER=variant.has_master,
                      STOCHASTIC=variant.stochastic_rounding, COMPACT_GRAD=variant.compact_grad, NCOLS=TABLE_COLUMNS,
                      TILE=TILE)
    if variant.state_bits == 32:
        from .masked_adamw import masked_adamw_kernel as kernel

        arguments = (tensor_table, tiles, *runtime_scalars)
    else:
        from .masked_adamw_8bit import masked_adamw_8bit_kernel as kernel

        arguments = (tensor_table, tiles, *qmaps, *runtime_scalars)
        constexprs.update(QUANT_BLOCK=QUANT_BLOCK, BLOCKS_PER_TILE=BLOCKS_PER_TILE)
    return TritonLaunch(kernel=kernel, arguments=arguments, constexprs=constexprs, grid=(tiles.shape[0],),
                        num_warps=NUM_WARPS)
