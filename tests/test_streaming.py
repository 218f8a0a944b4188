"""The numba kernels' streaming stores (pagedkv.backends.numba.stream) equal plain copies.

Calls stream only from 16 MiB up, far beyond the drawn cases of test_agreement, so
here the threshold is lowered to 0 and every call streams: each routine, every
layout and format, must still equal the reference bit for bit. ``stream_copy`` is
checked alone at every alignment of its destination, for every element size.
"""

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

import pagedkv
from pagedkv.backends import numba as numba_cpu
from pagedkv.backends._host import ALIGN_OUTPUTS_FROM, new_outputs
from pagedkv.backends.numba import stream as _numba_stream
from pagedkv.memory.device import HOST_ALIGNMENT, host_aligned
from pagedkv.testing import strategies as pst

from .conftest import bits, pool_bytes

ref = pagedkv.get_backend("numpy")
nb = pagedkv.get_backend("numba")


@njit
def _stream_then_fence(dst, at, src, off, n):
    _numba_stream.stream_copy(dst, at, src, off, n)
    _numba_stream.store_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.uint8, np.int8])
@pytest.mark.parametrize("shift", [0, 1, 4, 8, 13])
def test_stream_copy_equals_a_slice_copy_at_every_alignment(dtype, shift):
    """Destinations starting at every byte of a 16-byte word (``shift`` bytes off a 64-byte
    boundary, then ``at`` elements in), runs of 0 to 70 elements: the run is copied, nothing
    around it is touched. A shift that is not a multiple of the element size makes the array
    misaligned to its own elements, which stream_copy copies without streaming."""
    rng = np.random.default_rng(shift)
    size = np.dtype(dtype).itemsize
    src = rng.integers(0, 255, 200 * size, dtype=np.uint8).view(dtype)
    raw = host_aligned(300 * size + 64, np.uint8)
    for at in range(0, 20):
        for n in (0, 1, 3, 4, 5, 16, 17, 63, 70):
            for off in (0, 1, 7):
                raw[:] = 0xAB
                dst = raw[shift:shift + 250 * size].view(dtype)
                want = dst.copy()
                want[at:at + n] = src[off:off + n]
                _stream_then_fence(dst, at, src, off, n)
                np.testing.assert_array_equal(dst.view(np.uint8), want.view(np.uint8))


def test_host_pools_and_large_new_outputs_start_on_a_cache_line():
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=128, num_blocks=4, block_size=4)
    pool = pagedkv.KVPool(config)
    assert pool.host.ctypes.data % HOST_ALIGNMENT == 0 and not pool.host.any()
    tokens = ALIGN_OUTPUTS_FROM // (2 * 128 * 4)
    for n in (tokens, tokens + 3):
        k, v = new_outputs(pool, n)
        assert k.ctypes.data % HOST_ALIGNMENT == 0 and v.ctypes.data % HOST_ALIGNMENT == 0
        assert k.flags.c_contiguous and k.shape == v.shape == (n, 2, 128) and k.dtype == np.float32


def test_which_calls_stream():
    """Float32 rows from 16 MiB of K and V (a narrow format's encoders never stream); whole
    blocks of any format from 16 MiB."""
    config = pagedkv.CacheConfig(num_layers=2, num_kv_heads=8, head_dim=128, num_blocks=4, block_size=16)
    pool = pagedkv.KVPool(config)
    tokens = _numba_stream.STREAM_MIN_BYTES // (2 * 8 * 128 * 4)  # 8,192
    assert numba_cpu.streams_rows(pool, tokens) and not numba_cpu.streams_rows(pool, tokens - 1)
    narrow = pagedkv.KVPool(dataclasses.replace(config, dtype="bfloat16"))
    assert not numba_cpu.streams_rows(narrow, 10 * tokens)
    blocks = _numba_stream.STREAM_MIN_BYTES // (2 * 2 * 16 * 8 * 128 * 2)  # bfloat16 blocks, both layers
    assert numba_cpu.streams_blocks(narrow, blocks) and not numba_cpu.streams_blocks(narrow, blocks - 1)


def _configs():
    return pst.configs(max_layers=2, max_kv_heads=3, max_head_dim=9, max_blocks=6, max_block_size=4,
                       dtypes=tuple(pagedkv.geometry.formats.FORMATS))


always_stream = mock.patch.object(_numba_stream, "STREAM_MIN_BYTES", 0)


@given(st.data(), st.integers(0, 2**32 - 1))
def test_streamed_write_read_and_gather_equal_the_reference(data, seed):
    config = data.draw(_configs(), label="config")
    expected, actual = pst.filled_pool(config, seed), pst.filled_pool(config, seed)
    slots = data.draw(pst.slot_mappings(config, max_tokens=12))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    key, value = pst.token_arrays(config, len(slots), seed + 1)
    read_slots = data.draw(pst.slot_mappings(config, max_tokens=12, unique=False))
    tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3))
    with always_stream:
        assert numba_cpu.streams_rows(actual, 0) == (config.dtype == "float32")
        ref.write(expected, layer, key, value, slots)
        nb.write(actual, layer, key, value, slots)
        np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))
        for want, got in zip(ref.read(expected, layer, read_slots), nb.read(actual, layer, read_slots), strict=True):
            np.testing.assert_array_equal(bits(got), bits(want))
        for want, got in zip(ref.gather(expected, layer, tables, lens), nb.gather(actual, layer, tables, lens),
                             strict=True):
            np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))


@given(st.data(), st.integers(0, 2**32 - 1))
def test_streamed_block_copies_equal_the_reference(data, seed):
    config = data.draw(_configs(), label="config")
    expected, actual = pst.filled_pool(config, seed), pst.filled_pool(config, seed)
    src, dst = data.draw(pst.block_copies(config))
    other_expected, other_actual = pst.filled_pool(config, seed + 1), pst.filled_pool(config, seed + 1)
    for layer in range(config.num_layers if config.format.scale == "tensor" else 0):
        for pool in (other_expected, other_actual):  # fp8 bytes move only between like scales
            pool.set_kv_scales(layer, *expected.kv_scales[layer])
    out, into = data.draw(pst.block_copies(config, same_pool=False))
    with always_stream:
        assert numba_cpu.streams_blocks(actual, 0)
        ref.copy_blocks(expected, src, dst)
        nb.copy_blocks(actual, src, dst)
        ref.swap_blocks(expected, other_expected, out, into)
        nb.swap_blocks(actual, other_actual, out, into)
    np.testing.assert_array_equal(pool_bytes(actual), pool_bytes(expected))
    np.testing.assert_array_equal(pool_bytes(other_actual), pool_bytes(other_expected))
