"""Every backend equals the numpy reference bit for bit, results and the whole pool after.

The pools start from the same random numbers, so a kernel that writes a
wrong element, or one too many, shows up as a difference somewhere in the pool.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import pagedkv
from pagedkv.testing import strategies as pst

from .conftest import device_empty, host, on_device

ref = pagedkv.get_backend("numpy")

# The simulated GPU runs every thread as a Python thread: keep its cases small.
small_configs = pst.configs(max_layers=2, max_kv_heads=3, max_head_dim=4, max_blocks=6, max_block_size=4)


def _maybe_out(backend, config, num_tokens, data):
    """Half the time, output buffers to fill (prefilled with NaN, so a missed row shows)."""
    if not data.draw(st.booleans(), label="out"):
        return None
    shape = (num_tokens, config.num_kv_heads, config.head_dim)
    return device_empty(backend, shape), device_empty(backend, shape)


@given(small_configs, st.data(), st.integers(0, 2**32 - 1))
def test_write(fast_backend, config, data, seed):
    expected = pst.filled_pool(config, seed)
    actual = on_device(expected, fast_backend)
    slots = data.draw(pst.slot_mappings(config, max_tokens=12))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    key, value = pst.token_arrays(config, len(slots), seed + 1)
    ref.write(expected, layer, key, value, slots)
    fast_backend.write(actual, layer, key, value, slots)
    np.testing.assert_array_equal(host(actual), expected.data)


@given(small_configs, st.data(), st.integers(0, 2**32 - 1))
def test_read(fast_backend, config, data, seed):
    expected_pool = pst.filled_pool(config, seed)
    actual_pool = on_device(expected_pool, fast_backend)
    slots = data.draw(pst.slot_mappings(config, max_tokens=12, unique=False))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    out = _maybe_out(fast_backend, config, len(slots), data)
    got = fast_backend.read(actual_pool, layer, slots, out=out)
    if out is not None:
        assert got[0] is out[0] and got[1] is out[1]
    for want, g in zip(ref.read(expected_pool, layer, slots), got, strict=True):
        np.testing.assert_array_equal(host(g), want)
    np.testing.assert_array_equal(host(actual_pool), expected_pool.data)


@given(small_configs, st.data(), st.integers(0, 2**32 - 1))
def test_gather(fast_backend, config, data, seed):
    expected_pool = pst.filled_pool(config, seed)
    actual_pool = on_device(expected_pool, fast_backend)
    tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    want = ref.gather(expected_pool, layer, tables, lens)
    got = fast_backend.gather(actual_pool, layer, tables, lens,
                              out=_maybe_out(fast_backend, config, int(lens.sum()), data))
    for w, g in zip(want, got, strict=True):
        assert host(g).dtype == w.dtype
        np.testing.assert_array_equal(host(g), w)


@given(small_configs, st.data(), st.integers(0, 2**32 - 1))
def test_copy_blocks(fast_backend, config, data, seed):
    expected = pst.filled_pool(config, seed)
    actual = on_device(expected, fast_backend)
    src, dst = data.draw(pst.block_copies(config))
    ref.copy_blocks(expected, src, dst)
    fast_backend.copy_blocks(actual, src, dst)
    np.testing.assert_array_equal(host(actual), expected.data)


@given(small_configs, st.data(), st.integers(0, 2**32 - 1))
def test_swap_blocks(fast_backend, config, data, seed):
    src_pool = pst.filled_pool(config, seed)
    expected = pst.filled_pool(config, seed + 1)
    actual = on_device(expected, fast_backend)
    src, dst = data.draw(pst.block_copies(config, same_pool=False))
    ref.swap_blocks(src_pool, expected, src, dst)
    fast_backend.swap_blocks(on_device(src_pool, fast_backend), actual, src, dst)
    np.testing.assert_array_equal(host(actual), expected.data)
