"""8-bit blockwise state: both backends agree bit for bit, and follow fp32 AdamW within bitsandbytes' tolerances.

bitsandbytes' own ``test_optimizer8bit`` (tests/test_optim.py) runs 50 steps of Adam8bit against torch.optim.Adam
with params ``randn * 0.1`` and grads ``randn * 0.01``; after each step it requires fewer than 20 dequantised state
entries outside ``isclose(atol=3e-3, rtol=1e-3)``, a mean absolute parameter error below 6e-5 and a mean relative
error below 6e-4 (fp32; bf16: 1.7e-4 and 1.6e-3), and then copies the 8-bit run's params and dequantised states into
the reference so that errors do not compound. We apply the same protocol and tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sparse_rl.kernels.layout import QUANT_BLOCK, TILE, SelectionLayout
from sparse_rl.kernels.masked_adamw_8bit import quantisation_maps

from sparse_rl import MaskedAdamW, SubnetworkMask
from tests.test_optim_reference import ReferenceMaskedAdamW, assert_bits_equal, random_grads, random_problem

pytest.importorskip("bitsandbytes")


def block_of_each_entry(selection: torch.Tensor) -> torch.Tensor:
    """Quantisation block of every selected entry: its tile's first block + (rank inside the tile) // 256."""
    flat = selection.reshape(-1).numpy()
    layout = SelectionLayout.from_selection(selection)
    selected_tiles = (np.arange(flat.size) // TILE)[flat]
    rank = np.arange(selected_tiles.size) - layout.tile_offsets.numpy()[selected_tiles]
    return torch.from_numpy(layout.block_offsets.numpy()[selected_tiles] + rank // QUANT_BLOCK)


def dequantise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: torch.Tensor):
    return qmap[codes.long()] * absmax[block]


def test_backends_agree_bit_for_bit():
    """Triton and CPU agree bit for bit, and a compact gradient (selected entries only, as the compact-gradient hook
    leaves it) gives the same bits as the dense one on both."""
    for dtype, master in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        params, mask = random_problem({"w": (37, 50), "v": (TILE + 300,), "full": (600,)}, 0.4, dtype)
        # a tile with more than 256 selected entries: several blocks per tile
        mask = SubnetworkMask({**mask.selections, "full": torch.ones(600, dtype=torch.bool)})
        grads = random_grads(params, 3)
        runs = []
        for backend, compact in (("triton", False), ("cpu", False), ("triton", True), ("cpu", True)):
            ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
            opt = MaskedAdamW(ours.items(), mask, lr=1e-2, state_bits=8, master_weights=master, backend=backend)
            for g in grads:
                for n, p in ours.items():
                    if compact and not mask[n].all():
                        p.grad, p.compact_grad = None, g[n][mask[n]].clone()
                    else:
                        p.grad = g[n].clone()
                opt.step()
            runs.append((f"{backend}, compact={compact}", ours, opt))
        _, ours_t, opt_t = runs[0]
        for label, ours_c, opt_c in runs[1:]:
            for n in params:
                assert_bits_equal(ours_t[n], ours_c[n], f"{dtype} param {n} ({label})")
                for key in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2", "master"):
                    if key in opt_t.state[ours_t[n]]:
                        assert_bits_equal(opt_t.state[ours_t[n]][key], opt_c.state[ours_c[n]][key],
                                          f"{key} of {n} ({label})")


@pytest.mark.parametrize("dtype,steps,backend", [(torch.float32, 50, "cpu"), (torch.bfloat16, 50, "cpu"),
                                                 (torch.float32, 4, "triton")], ids=str)
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_tracks_fp32_adamw_within_bitsandbytes_tolerances(dtype, steps, backend, density):
    shape = (1024, 32) if backend == "cpu" else (64, 40)
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    mask = SubnetworkMask({"w": torch.rand(shape, generator=g) < density})
    ours = torch.nn.Parameter(start.clone())
    theirs = {"w": start.float().clone()}
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt = MaskedAdamW([("w", ours)], mask, state_bits=8, backend=backend, **hyper)
    reference = ReferenceMaskedAdamW(theirs, mask, **hyper)
    qmap1, qmap2 = quantisation_maps()
    selected = mask["w"]
    block = block_of_each_entry(selected)
    patol = 1.7e-4 if dtype == torch.bfloat16 else 6e-5
    prtol = 1.6e-3 if dtype == torch.bfloat16 else 6e-4
    for _ in range(steps):
        grad = (torch.randn(shape, generator=g) * 0.01).to(dtype)
        ours.grad = grad
        opt.step()
        reference.step({"w": grad.float()})
        state, ref_state = opt.state[ours], reference.state["w"]
        exp_avg = dequantise(state["exp_avg"], state["absmax1"], qmap1, block)
        exp_avg_sq = dequantise(state["exp_avg_sq"], state["absmax2"], qmap2, block)
        for ours_state, ref in ((exp_avg, ref_state["exp_avg"]), (exp_avg_sq, ref_state["exp_avg_sq"])):
            assert (~torch.isclose(ours_state, ref, atol=3e-3, rtol=1e-3)).sum() < 20
        error = (ours.detach().float() - theirs["w"])[selected].abs()
        assert error.mean() < patol
        assert (error / (theirs["w"][selected].abs() + 1e-9)).mean() < prtol
        # resynchronise, as bitsandbytes' test does, so errors do not compound
        theirs["w"].copy_(ours.detach().float())
        ref_state["exp_avg"], ref_state["exp_avg_sq"] = exp_avg.clone(), exp_avg_sq.clone()
        if "master" in state:
            ref_state["master"] = state["master"].clone()
    assert torch.equal(ours.detach()[~selected], start[~selected])


def test_state_is_a_quarter_of_fp32_state():
    params, mask = random_problem({"w": (256, 512)}, 0.1)
    sizes = {}
    for bits in (32, 8):
        p = torch.nn.Parameter(params["w"].clone())
        opt = MaskedAdamW([("w", p)], mask, state_bits=bits)
        p.grad = torch.randn_like(p)
        opt.step()
        state = opt.state[p]
        sizes[bits] = sum(state[k].numel() * state[k].element_size() for k in state if k != "step")
        k = int(mask["w"].sum())
        assert state["exp_avg"].numel() == k
        if bits == 8:
            assert state["exp_avg"].dtype == torch.uint8
            assert state["absmax1"].numel() == SelectionLayout.from_selection(mask["w"]).num_blocks
    assert sizes[8] < 0.3 * sizes[32]


def test_cpu_code_search_equals_the_kernels_binary_search():
    """The CPU path's table-started walk returns the code of the Triton kernel's (bitsandbytes') binary search."""
    from numba import njit
    from sparse_rl.kernels.masked_adamw_cpu import _quantise, search_starts

    @njit
    def walk(values, qmap, starts, out):
        for i in range(values.size):
            out[i] = _quantise(values[i], qmap, starts)

    def binary_search(values, qmap):
        low, high = np.zeros(values.size, np.int64), np.full(values.size, 255, np.int64)
        for _ in range(8):
            pivot = (low + high) // 2
            higher = values > qmap[pivot]
            low, high = np.where(higher, pivot, low), np.where(higher, high, pivot)
        return np.where(np.abs(values - qmap[low]) <= np.abs(values - qmap[high]), low, high)

    rng = np.random.default_rng(0)
    for qmap, lowest in zip((q.numpy() for q in quantisation_maps()), (-1.0, 0.0)):
        midpoints = ((qmap[1:].astype(np.float64) + qmap[:-1]) / 2).astype(np.float32)
        values = np.concatenate([
            rng.uniform(lowest, 1.0, 100_000).astype(np.float32),
            (rng.uniform(lowest, 1.0, 10_000) * 10.0 ** -rng.integers(0, 8, 10_000)).astype(np.float32),
            qmap, midpoints, np.nextafter(midpoints, np.float32(2)), np.nextafter(midpoints, np.float32(-2)),
        ])
        values = np.clip(values, lowest, 1.0).astype(np.float32)
        codes = np.empty(values.size, np.uint8)
        walk(values, qmap, search_starts(qmap), codes)
        assert np.array_equal(codes, binary_search(values, qmap))


def test_map_needing_a_longer_walk_is_refused():
    """The CPU code search walks a fixed two steps from its table start: a map with codes packed closer than that
    (here 256 codes in [0, 0.01], many per 16-bit key range) must be refused, not quantised to the wrong code."""
    from sparse_rl.kernels.masked_adamw_cpu import search_starts

    dense_map = np.linspace(0.0, 0.01, 256, dtype=np.float32)
    with pytest.raises(ValueError, match="walk"):
        search_starts(dense_map)
    for qmap in quantisation_maps():  # bitsandbytes' maps pass
        search_starts(qmap.numpy())
