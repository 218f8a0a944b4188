"""Every backend equals the numpy reference bit for bit, results and the whole pool after,
in every storage format (the cuda backend too).

The pools start from the same random numbers, so a kernel that writes a
wrong element, or one too many, shows up as a difference somewhere in the pool.
Results are compared as bytes, so a NaN must be the same NaN.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pagedkv
from pagedkv.testing import strategies as pst

from .conftest import ALL_FORMATS, INPUT_KINDS, as_input, bits, device_empty, host, on_device, pool_bytes

ref = pagedkv.get_backend("numpy")


# The simulated GPU runs every thread as a Python thread: small cases, for every backend alike.
SMALL_CONFIGS = pst.configs(max_layers=2, max_kv_heads=3, max_head_dim=4, max_blocks=6, max_block_size=4,
                            dtypes=ALL_FORMATS)


def _maybe_out(backend, config, num_tokens, data):
    """Half the time, output buffers to fill (prefilled with NaN, so a missed row shows)."""
    if not data.draw(st.booleans(), label="out"):
        return None
    shape = (num_tokens, config.num_kv_heads, config.head_dim)
    return device_empty(backend, shape), device_empty(backend, shape)


# Whole (token, head) rows that int8's scale must survive: zeros, numbers so tiny that absmax / 127
# underflows to 0 (below 127 x 2**-150), subnormals, and tiny numbers beside one normal one.
_ROW_KINDS = (
    lambda rng, d: np.zeros(d, np.float32),
    lambda rng, d: np.float32(1e-44) * rng.choice([-1, 1], d).astype(np.float32),
    lambda rng, d: rng.uniform(-1e-39, 1e-39, d).astype(np.float32),
    lambda rng, d: np.where(np.arange(d) == rng.integers(d), np.float32(3.0), np.float32(-1e-44)).astype(np.float32),
)


def _tokens(config, n, seed):
    """K and V to write: normal numbers, with now and then a NaN, an inf, a huge or a tiny one, and
    now and then a whole row of zeros, tiny or subnormal numbers (:data:`_ROW_KINDS`)."""
    key, value = pst.token_arrays(config, n, seed)
    rng = np.random.default_rng(seed)
    for x in (key, value):
        flat = x.reshape(-1)
        if flat.size and rng.random() < 0.3:
            flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e30, 1e-30, -0.0])
        rows = x.reshape(-1, config.head_dim)
        for r in np.flatnonzero(rng.random(rows.shape[0]) < 0.2):
            rows[r] = _ROW_KINDS[rng.integers(len(_ROW_KINDS))](rng, config.head_dim)
    return key, value


@pytest.mark.parametrize("kind", range(len(_ROW_KINDS)))
def test_int8_rows_of_zeros_tiny_or_subnormal_numbers(backend, kind):
    """int8 rows whose absmax / 127 is 0 or subnormal, mixed with normal rows in one call of many
    tokens (so every worker thread gets some): stored as the reference stores them, bit for bit.
    Before, a tiny row got scale 0: the numba write divided by it (a raw SystemError, or one
    thread's remaining rows never written) and the simulated GPU raised OverflowError."""
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=8, block_size=4,
                                 dtype="int8")
    rng = np.random.default_rng(kind)
    key, value = pst.token_arrays(config, 24, 3)
    for x in (key, value):
        rows = x.reshape(-1, config.head_dim)
        rows[::2] = [_ROW_KINDS[kind](rng, config.head_dim) for _ in range(rows[::2].shape[0])]
    slots = np.arange(24, dtype=np.int64)
    expected = pst.filled_pool(config, 1)
    actual = on_device(expected, backend)
    ref.write(expected, 0, key, value, slots)
    backend.write(actual, 0, key, value, slots)
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))
    k, v = ref.read(expected, 0, slots)
    assert np.isfinite(k).all() and np.isfinite(v).all()
    np.testing.assert_allclose(k, key, atol=3 / 127 * np.abs(key).max())  # nothing lost but int8's rounding


@given(st.data(), st.integers(0, 2**32 - 1))
def test_write(fast_backend, data, seed):
    config = data.draw(SMALL_CONFIGS, label="config")
    expected = pst.filled_pool(config, seed)
    actual = on_device(expected, fast_backend)
    slots = data.draw(pst.slot_mappings(config, max_tokens=12))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    key, value = _tokens(config, len(slots), seed + 1)
    kind = data.draw(st.sampled_from(INPUT_KINDS), label="input kind")
    ref.write(expected, layer, key, value, slots)
    fast_backend.write(actual, layer, as_input(key, kind), as_input(value, kind), as_input(slots, kind))
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3", "int8"])
def test_a_long_write_of_consecutive_and_scattered_slots(layout, dtype):
    """A write longer than the drawn cases (70 tokens: a prefill's consecutive slots across
    several blocks, a shuffled stretch and padding), every layout and kind of format."""
    config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=3, head_dim=8, num_blocks=12, block_size=8,
                                 layout=layout, dtype=dtype)
    rng = np.random.default_rng(5)
    slots = np.concatenate([np.arange(3, 43), rng.permutation(np.arange(50, 70)), [-1] * 10])
    slots = slots.astype(np.int64)
    key, value = _tokens(config, slots.size, 6)
    expected = pst.filled_pool(config, 7)
    actual = pst.filled_pool(config, 7)
    ref.write(expected, 1, key, value, slots)
    pagedkv.get_backend("numba").write(actual, 1, key, value, slots)
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))


@given(st.data(), st.integers(0, 2**32 - 1))
def test_read(fast_backend, data, seed):
    config = data.draw(SMALL_CONFIGS, label="config")
    expected_pool = pst.filled_pool(config, seed)
    actual_pool = on_device(expected_pool, fast_backend)
    slots = data.draw(pst.slot_mappings(config, max_tokens=12, unique=False))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    out = _maybe_out(fast_backend, config, len(slots), data)
    got = fast_backend.read(actual_pool, layer, slots, out=out)
    if out is not None:
        assert got[0] is out[0] and got[1] is out[1]
    for want, g in zip(ref.read(expected_pool, layer, slots), got, strict=True):
        np.testing.assert_array_equal(bits(g), bits(want))
    for want, g in zip(ref.read(expected_pool, layer, slots, raw=True),
                       fast_backend.read(actual_pool, layer, slots, raw=True), strict=True):
        assert (want is None) == (g is None)
        if want is not None:
            np.testing.assert_array_equal(bits(g), bits(want))
    np.testing.assert_array_equal(pool_bytes(actual_pool), pool_bytes(expected_pool))


@given(st.data(), st.integers(0, 2**32 - 1))
def test_gather(fast_backend, data, seed):
    config = data.draw(SMALL_CONFIGS, label="config")
    expected_pool = pst.filled_pool(config, seed)
    actual_pool = on_device(expected_pool, fast_backend)
    tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    want = ref.gather(expected_pool, layer, tables, lens)
    got = fast_backend.gather(actual_pool, layer, tables, lens,
                              out=_maybe_out(fast_backend, config, int(lens.sum()), data))
    for w, g in zip(want, got, strict=True):
        assert host(g).dtype == w.dtype
        np.testing.assert_array_equal(bits(g), bits(w))


@given(st.data(), st.integers(0, 2**32 - 1))
def test_copy_blocks(fast_backend, data, seed):
    config = data.draw(SMALL_CONFIGS, label="config")
    expected = pst.filled_pool(config, seed)
    actual = on_device(expected, fast_backend)
    src, dst = data.draw(pst.block_copies(config))
    ref.copy_blocks(expected, src, dst)
    fast_backend.copy_blocks(actual, src, dst)
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))


@given(st.data(), st.integers(0, 2**32 - 1))
def test_swap_blocks(fast_backend, data, seed):
    config = data.draw(SMALL_CONFIGS, label="config")
    src_pool = pst.filled_pool(config, seed)
    expected = pst.filled_pool(config, seed + 1)
    for layer in range(config.num_layers if config.format.scale == "tensor" else 0):
        expected.set_kv_scales(layer, *src_pool.kv_scales[layer])  # fp8 bytes move only between like scales
    actual = on_device(expected, fast_backend)
    src, dst = data.draw(pst.block_copies(config, same_pool=False))
    ref.swap_blocks(src_pool, expected, src, dst)
    fast_backend.swap_blocks(on_device(src_pool, fast_backend), actual, src, dst)
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))
