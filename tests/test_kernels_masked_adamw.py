"""Masked AdamW kernels (Triton under TRITON_INTERPRET=1, and the numba CPU path) against the plain PyTorch reference.

Both backends must match the reference bit for bit: moments, fp32 parameters and master copies, and bf16/fp16
parameters rounded to nearest even. Unselected entries must keep their exact bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_rl.kernels.layout import TILE, SelectionLayout

from sparse_rl import MaskedAdamW, SubnetworkMask
from tests.test_optim_reference import ReferenceMaskedAdamW, assert_bits_equal, random_grads, random_problem

BACKENDS = ["triton", "cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Awkward sizes: below, around and above a tile (1024), and 2-D shapes that are no multiple of anything.
SHAPES = {"w": (37, 50), "v": (TILE + 1,), "s": (5,), "one": (1,)}


def _run_both(params, mask, grads_per_step, *, backend, lrs=None, master_weights=True, compact=False, **hyper):
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, **hyper}
    ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    theirs = {n: p.clone() for n, p in params.items()}
    optimizer = MaskedAdamW(ours.items(), mask, master_weights=master_weights, backend=backend, **hyper)
    reference = ReferenceMaskedAdamW(theirs, mask, master_weights=master_weights, **hyper)
    for step, grads in enumerate(grads_per_step):
        if lrs is not None:  # lr changes between steps, as under a scheduler
            optimizer.param_groups[0]["lr"] = reference.lr = lrs[step]
        for n, p in ours.items():
            if compact and mask[n].any() and not mask[n].all():  # as the compact-gradient hook leaves it
                p.grad, p.compact_grad = None, grads[n][mask[n]].clone()
            else:
                p.grad = grads[n].clone()
        optimizer.step()
        reference.step(grads)
    return ours, theirs, optimizer, reference


def _assert_matches_reference(ours, theirs, optimizer, reference, mask, start):
    for n, p in ours.items():
        assert_bits_equal(p, theirs[n], f"param {n}")
        assert_bits_equal(p.detach()[~mask[n]], start[n][~mask[n]], f"unselected entries of {n}")
        if n in {k for k, v in mask.items() if v.any()}:
            state = optimizer.state[p]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in reference.state[n]:
                    assert_bits_equal(state[key], reference.state[n][key], f"{key} of {n}")
            assert ("master" in state) == ("master" in reference.state[n])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master_weights", [
    (torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True),
    (torch.float16, False),
], ids=str)
def test_bit_exact_against_reference(backend, dtype, master_weights):
    params, mask = random_problem(SHAPES, 0.3, dtype)
    start = {n: p.clone() for n, p in params.items()}
    grads = random_grads(params, 3)
    ours, theirs, opt, ref = _run_both(params, mask, grads, backend=backend, master_weights=master_weights,
                                       lrs=[1e-2, 3e-3, 2e-2])
    _assert_matches_reference(ours, theirs, opt, ref, mask, start)
    selected = mask["w"]
    assert not torch.equal(ours["w"].detach()[selected], start["w"][selected])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master_weights", [
    (torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False),
], ids=str)
def test_compact_gradients_bit_exact(backend, dtype, master_weights):
    """A compact gradient (selected entries in flat order, read at their slots) gives the dense gradient's bits."""
    params, mask = random_problem(SHAPES, 0.3, dtype)
    start = {n: p.clone() for n, p in params.items()}
    grads = random_grads(params, 3)
    ours, theirs, opt, ref = _run_both(params, mask, grads, backend=backend, master_weights=master_weights,
                                       compact=True, lrs=[1e-2, 3e-3, 2e-2])
    _assert_matches_reference(ours, theirs, opt, ref, mask, start)
    partly = [n for n in ours if mask[n].any() and not mask[n].all()]
    assert partly and all(ours[n].grad is None for n in partly)  # the step had no dense gradient to read


def test_compact_gradient_of_wrong_size_is_refused():
    params, mask = random_problem({"w": (37, 50)}, 0.3, torch.float32)
    p = torch.nn.Parameter(params["w"].clone())
    optimizer = MaskedAdamW([("w", p)], mask, backend="cpu")
    p.compact_grad = torch.zeros(int(mask["w"].sum()) - 1)
    with pytest.raises(RuntimeError, match="compact gradient of 'w' has"):
        optimizer.step()
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="both a dense .grad and a compact_grad"):
        optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_full_masks(backend):
    params, _ = random_problem({"empty": (300,), "full": (33, 65), "partial": (2050,)}, 0.5)
    mask = SubnetworkMask({"empty": torch.zeros(300, dtype=torch.bool), "full": torch.ones(33, 65, dtype=torch.bool),
                           "partial": torch.arange(2050) % 3 == 0})
    start = {n: p.clone() for n, p in params.items()}
    ours, theirs, opt, ref = _run_both(params, mask, random_grads(params, 2), backend=backend)
    _assert_matches_reference(ours, theirs, opt, ref, mask, start)
    assert torch.equal(ours["empty"].detach(), start["empty"])
    assert not opt.state[ours["empty"]]  # an empty selection holds no state at all


def test_backends_agree_on_stochastic_rounding():
    """Stochastic rounding draws the same Philox numbers on both backends, for bf16 and fp16."""
    for dtype in (torch.bfloat16, torch.float16):
        params, mask = random_problem(SHAPES, 0.4, dtype)
        grads = random_grads(params, 2)
        results = []
        for backend in BACKENDS:
            ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
            opt = MaskedAdamW(ours.items(), mask, lr=1e-3, master_weights=False, stochastic_rounding=True,
                              backend=backend, seed=7)
            for g in grads:
                for n, p in ours.items():
                    p.grad = g[n].clone()
                opt.step()
            results.append(ours)
        for n in params:
            assert_bits_equal(results[0][n], results[1][n], f"{dtype} {n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_is_unbiased(dtype):
    """Updates far below half an ulp survive on average: the mean moves by lr per step, as the fp32 value would."""
    n, lr, steps = 4096, 1e-4, 20
    p = torch.nn.Parameter(torch.full((n,), 1.0, dtype=dtype))
    mask = SubnetworkMask({"w": torch.ones(n, dtype=torch.bool)})
    opt = MaskedAdamW([("w", p)], mask, lr=lr, weight_decay=0.0, master_weights=False, stochastic_rounding=True,
                      backend="cpu")
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)  # Adam's first steps move every entry by +lr
        opt.step()
    drift = float(p.detach().float().mean()) - 1.0
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    # each entry is a sum of 20 Bernoulli(lr/ulp)-sized ulp steps; the mean over 4096 entries has std ~ ulp*sqrt(p)/64
    assert abs(drift - steps * lr) < 5 * ulp * (steps * lr / ulp) ** 0.5 / 64
    assert drift > 0.5 * steps * lr  # round-to-nearest would leave every entry at exactly 1.0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(1, 3 * TILE),
    density=st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_triton_kernel_property(numel, density, dtype, seed):
    _property(numel, density, dtype, seed, "triton")


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 5 * TILE),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_cpu_path_property(numel, density, dtype, seed):
    _property(numel, density, dtype, seed, "cpu")


def _property(numel, density, dtype, seed, backend):
    params, mask = random_problem({"p": (numel,), "q": (3, 7)}, density, dtype, seed=seed)
    start = {n: p.clone() for n, p in params.items()}
    ours, theirs, opt, ref = _run_both(params, mask, random_grads(params, 2, seed=seed + 1), backend=backend)
    _assert_matches_reference(ours, theirs, opt, ref, mask, start)


def test_layout_slots_follow_flat_order():
    """Compact slot of every selected entry = its rank among selected entries (the layout's contract)."""
    selection = torch.rand(3 * TILE + 17) < 0.3
    layout = SelectionLayout.from_selection(selection)
    words = layout.mask_words.numpy().view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
    assert np.array_equal(bits[: selection.numel()], selection.numpy())
    assert not bits[selection.numel():].any()
    counts = np.add.reduceat(selection.numpy().astype(np.int64), np.arange(0, selection.numel(), TILE))
    assert layout.tile_offsets.tolist() == [0, *np.cumsum(counts).tolist()]
    assert layout.num_selected == int(selection.sum())


def test_fp16_bit_conversions_match_numpy():
    """The CPU path's hand-written fp16 <-> fp32 conversions agree with numpy on every half and on edge floats."""
    from numba import njit
    from sparse_rl.kernels.masked_adamw_cpu import _f32_to_fp16_bits, _fp16_bits_to_f32

    @njit
    def decode(halves, out):
        for i in range(halves.size):
            out[i] = _fp16_bits_to_f32(halves[i])

    @njit
    def encode(values, out):
        for i in range(values.size):
            out[i] = _f32_to_fp16_bits(values[i])

    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    decoded = np.empty(2**16, np.float32)
    decode(halves, decoded)
    expected = halves.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expected)
    assert np.array_equal(decoded[finite].view(np.uint32), expected[finite].view(np.uint32))
    assert np.isnan(decoded[~finite]).all()

    rng = np.random.default_rng(0)
    floats = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        expected[finite],  # exact halves
        (expected[finite].astype(np.float64) * (1 + 2.0**-11)).astype(np.float32),  # near ties
        np.float32([6.1035156e-05, 5.9604645e-08, 2.9802322e-08, 65504.0, 65520.0, 65519.99, np.inf, -np.inf]),
    ])
    encoded = np.empty(floats.size, np.uint16)
    encode(floats, encoded)
    with np.errstate(over="ignore"):
        reference = floats.astype(np.float16).view(np.uint16)
    nan = np.isnan(floats)
    assert np.array_equal(encoded[~nan], reference[~nan])
    assert np.isnan(encoded[nan].view(np.float16)).all()
