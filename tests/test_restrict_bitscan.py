"""The packed-bit gather and swap against boolean indexing (hypothesis: shapes, densities, dtypes, odd bit patterns)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rl.restrict import bitscan

pytestmark = pytest.mark.skipif(not bitscan.available(), reason="numba is not installed")


def _case(numel: int, density: float, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    selection = torch.rand(numel, generator=generator) < density
    values = torch.randint(-2**15, 2**15, (numel,), generator=generator, dtype=torch.int32)
    flat = values.to(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16 else values.view(torch.float32)
    return flat.clone(), selection, np.packbits(selection.numpy())


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 300), density=st.sampled_from([0.0, 0.03, 0.5, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_gather_and_swap_equal_boolean_indexing_bit_for_bit(numel, density, dtype, seed):
    flat, selection, packed = _case(numel, density, dtype, seed)
    count = int(selection.sum())
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    gathered = bitscan.gather_selected(flat, packed, count)
    assert torch.equal(gathered.view(bits), flat[selection].view(bits))  # NaN payloads included: compared as bits

    original = flat.clone()
    stored = torch.arange(count, dtype=torch.int32).to(bits).view(dtype)
    expected_stored = original[selection].clone()
    bitscan.swap_selected(flat, packed, stored)
    expected = original.clone()
    expected[selection] = torch.arange(count, dtype=torch.int32).to(bits).view(dtype)
    assert torch.equal(flat.view(bits), expected.view(bits))
    assert torch.equal(stored.view(bits), expected_stored.view(bits))
    bitscan.swap_selected(flat, packed, stored)  # an involution: everything back
    assert torch.equal(flat.view(bits), original.view(bits))


def test_packed_bits_at_an_unaligned_address_are_read_alike():
    """A mask's bytes may start anywhere (a slice, a loaded file): the 64-entry words are read unaligned."""
    flat, selection, packed = _case(1000, 0.2, torch.float32, 7)
    shifted = np.concatenate([np.zeros(3, dtype=np.uint8), packed])[3:]
    assert shifted.ctypes.data % 8 != 0
    count = int(selection.sum())
    gathered = bitscan.gather_selected(flat, shifted, count)
    assert torch.equal(gathered.view(torch.int32), flat[selection].view(torch.int32))  # NaN payloads: as bits


def test_a_count_that_disagrees_with_the_bits_is_refused_without_writing_past_the_output():
    flat, selection, packed = _case(100, 0.5, torch.float32, 0)
    count = int(selection.sum())
    with pytest.raises(RuntimeError, match="select"):
        bitscan.gather_selected(flat, packed, count - 1)
    with pytest.raises(ValueError, match="do not fit"):
        bitscan.gather_selected(flat[:-9], packed, count)
    with pytest.raises(ValueError, match="selected entries"):
        bitscan.swap_selected(flat, packed, torch.zeros(count, dtype=torch.float64))
