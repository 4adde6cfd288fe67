"""``sparse_rl.kernels.launch``, the one entry of the four launchers: it refuses what no kernel can read, naming it."""

from __future__ import annotations

import pytest
import torch
from sparse_rl.kernels import launch
from sparse_rl.kernels.layout import TABLE_COLUMNS, AdamWScalars, KernelVariant

SCALARS = AdamWScalars.for_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
TABLE = torch.zeros(1, TABLE_COLUMNS, dtype=torch.int64)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launch_refuses_bad_tables(backend):
    tiles = torch.zeros(3, 2, dtype=torch.int32)
    fp32 = KernelVariant(torch.float32)
    with pytest.raises(ValueError, match="tensor_table must be int64"):
        launch(TABLE.int(), tiles[:0], SCALARS, fp32, backend=backend)
    with pytest.raises(ValueError, match="tiles must be int32"):
        launch(TABLE, tiles[:0].long(), SCALARS, fp32, backend=backend)
    misaligned = torch.zeros(7, dtype=torch.int32)[1:].view(3, 2)  # starts 4 bytes into its storage
    with pytest.raises(ValueError, match="8-byte aligned"):
        launch(TABLE, misaligned, SCALARS, fp32, backend=backend)
    maps = (torch.zeros(256), torch.zeros(256))
    with pytest.raises(ValueError, match="32-bit state takes no quantisation maps"):
        launch(TABLE, tiles[:0], SCALARS, fp32, qmaps=maps, backend=backend)
    with pytest.raises(ValueError, match="8-bit state takes two"):
        launch(TABLE, tiles[:0], SCALARS, KernelVariant(torch.float32, state_bits=8), backend=backend)
    with pytest.raises(ValueError, match="256 entries"):
        launch(TABLE, tiles[:0], SCALARS, KernelVariant(torch.float32, state_bits=8),
               qmaps=(torch.zeros(255), torch.zeros(256)), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        launch(TABLE, tiles[:0], SCALARS, fp32, backend="cuda")


def test_variant_refuses_combinations_no_kernel_has():
    with pytest.raises(ValueError, match="fp32 parameters take no master copy"):
        KernelVariant(torch.float32, has_master=True)
    with pytest.raises(ValueError, match="not both"):
        KernelVariant(torch.bfloat16, has_master=True, stochastic_rounding=True)
    with pytest.raises(TypeError, match="float64"):
        KernelVariant(torch.float64)
    assert len({v.name for v in KernelVariant.all()}) == 28
