"""The numpy reference against oracles that do not use its offset arithmetic.

The oracle reads a token through ``pool.k(layer)`` / ``pool.v(layer)``: numpy's
own reshape of the flat buffer, independent of :mod:`pagedkv.geometry.layout`'s
offset functions that the reference uses.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import pagedkv
from pagedkv import CacheConfig, KVPool
from pagedkv.testing import strategies as pst

ref = pagedkv.get_backend("numpy")


def view_token(pool, layer, kv, slot):
    """The [H, D] numbers of the token at ``slot``, through numpy's 4-D view."""
    block, pos = divmod(int(slot), pool.config.block_size)
    view = (pool.k if kv == 0 else pool.v)(layer)
    return view[block, pos] if pool.config.layout == "NHD" else view[block, :, pos]


def view_block(pool, layer, kv, block):
    return (pool.k if kv == 0 else pool.v)(layer)[block]


# ---- the seeds' scenarios, re-expressed ---------------------------------------------------------

def test_boostr_reshape_and_cache():
    """boostr: 4 blocks of 8, 2 heads of 4; tokens to slots 0, 1 and 9 (block 1, offset 1)."""
    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=8))
    key = (np.arange(3 * 2 * 4, dtype=np.float32) * 0.1).reshape(3, 2, 4)
    value = key * 2
    ref.write(pool, 0, key, value, np.array([0, 1, 9]))
    assert pool.k(0).shape == (4, 8, 2, 4)
    assert pool.k(0)[0, 0, 0, 1] == np.float32(0.1)
    np.testing.assert_array_equal(pool.k(0)[1, 1], key[2])
    np.testing.assert_array_equal(pool.v(0)[0, 1], value[1])


def test_llama_rs_write_read_copy_and_gather():
    """llama_rs paged.rs: head-major (HND) blocks; write two positions, gather, copy-on-write."""
    pool = KVPool(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=16, block_size=8, layout="HND"))
    k1, v1 = np.array([[[1, 2, 3, 4]]], np.float32), np.array([[[5, 6, 7, 8]]], np.float32)
    k2, v2 = k1 * 10, v1 * 10
    block = 3
    ref.write(pool, 0, k1, v1, np.array([block * 8 + 0]))
    ref.write(pool, 0, k2, v2, np.array([block * 8 + 1]))
    k, v, cu = ref.gather(pool, 0, np.array([[block]], np.int32), np.array([2], np.int32))
    np.testing.assert_array_equal(k, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(v, np.concatenate([v1, v2]))
    assert cu.tolist() == [0, 2]
    ref.copy_blocks(pool, np.array([block]), np.array([7]))
    k, v = ref.read(pool, 0, np.array([7 * 8 + 0, 7 * 8 + 1]))
    np.testing.assert_array_equal(k, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(v, np.concatenate([v1, v2]))


# ---- properties against the view oracle ---------------------------------------------------------

@given(pst.configs(), st.data(), st.integers(0, 2**32 - 1))
def test_write_stores_exactly_the_named_slots(config, data, seed):
    pool = pst.filled_pool(config, seed)
    before = _wrap(config, pool.data.copy())
    slots = data.draw(pst.slot_mappings(config))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    key, value = pst.token_arrays(config, len(slots), seed + 1)
    ref.write(pool, layer, key, value, slots)
    for t, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(view_token(pool, layer, 0, slot), key[t])
            np.testing.assert_array_equal(view_token(pool, layer, 1, slot), value[t])
            for kv in (0, 1):  # put the old numbers back, so that the rest can be compared
                view_token(pool, layer, kv, slot)[...] = view_token(before, layer, kv, slot)
    np.testing.assert_array_equal(pool.data, before.data)


def _wrap(config, data):
    pool = KVPool(config)
    pool.data[:] = data
    return pool


@given(pst.configs(), st.data(), st.integers(0, 2**32 - 1))
def test_read_returns_what_write_stored(config, data, seed):
    pool = pst.filled_pool(config, seed)
    slots = data.draw(pst.slot_mappings(config))
    key, value = pst.token_arrays(config, len(slots), seed + 1)
    ref.write(pool, config.num_layers - 1, key, value, slots)
    k, v = ref.read(pool, config.num_layers - 1, slots)
    real = slots >= 0
    np.testing.assert_array_equal(k[real], key[real])
    np.testing.assert_array_equal(v[real], value[real])
    assert not k[~real].any() and not v[~real].any()  # padding reads as zeros


@given(pst.configs(), st.data(), st.integers(0, 2**32 - 1))
def test_gather_equals_a_dense_per_sequence_cache(config, data, seed):
    pool = pst.filled_pool(config, seed)
    tables, lens = data.draw(pst.block_tables(config))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    k, v, cu = ref.gather(pool, layer, tables, lens)
    assert cu.dtype == np.int32 and cu.tolist() == [0, *np.cumsum(lens).tolist()]
    for b, n in enumerate(lens):
        # the dense cache of sequence b, built token by token through the views
        dense_k = [view_token(pool, layer, 0, tables[b, p // config.block_size] * config.block_size
                              + p % config.block_size) for p in range(n)]
        dense_v = [view_token(pool, layer, 1, tables[b, p // config.block_size] * config.block_size
                              + p % config.block_size) for p in range(n)]
        got_k, got_v = k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]]
        assert got_k.shape == (n, config.num_kv_heads, config.head_dim)
        if n:
            np.testing.assert_array_equal(got_k, np.stack(dense_k))
            np.testing.assert_array_equal(got_v, np.stack(dense_v))


@given(pst.configs(), st.data(), st.integers(0, 2**32 - 1))
def test_copy_blocks_moves_exactly_the_named_blocks(config, data, seed):
    pool = pst.filled_pool(config, seed)
    before = _wrap(config, pool.data.copy())
    src, dst = data.draw(pst.block_copies(config))
    ref.copy_blocks(pool, src, dst)
    moved = dict(zip(dst.tolist(), src.tolist(), strict=True))
    for layer in range(config.num_layers):
        for kv in (0, 1):
            for block in range(config.num_blocks):
                expected = view_block(before, layer, kv, moved.get(block, block))
                np.testing.assert_array_equal(view_block(pool, layer, kv, block), expected)


@given(pst.configs(), st.data(), st.integers(0, 2**32 - 1))
def test_swap_blocks_moves_exactly_the_named_blocks(config, data, seed):
    src_pool = pst.filled_pool(config, seed)
    dst_pool = pst.filled_pool(config, seed + 1)
    src_before, dst_before = src_pool.data.copy(), _wrap(config, dst_pool.data.copy())
    src, dst = data.draw(pst.block_copies(config, same_pool=False))
    ref.swap_blocks(src_pool, dst_pool, src, dst)
    np.testing.assert_array_equal(src_pool.data, src_before)  # the source pool is only read
    moved = dict(zip(dst.tolist(), src.tolist(), strict=True))
    for layer in range(config.num_layers):
        for kv in (0, 1):
            for block in range(config.num_blocks):
                expected = (view_block(src_pool, layer, kv, moved[block]) if block in moved
                            else view_block(dst_before, layer, kv, block))
                np.testing.assert_array_equal(view_block(dst_pool, layer, kv, block), expected)


def test_empty_inputs_are_fine():
    config = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=3, num_blocks=2, block_size=2)
    pool = KVPool(config)
    empty = np.zeros((0, 2, 3), np.float32)
    ref.write(pool, 0, empty, empty, np.zeros(0, np.int64))
    k, v = ref.read(pool, 0, np.zeros(0, np.int64))
    assert k.shape == (0, 2, 3)
    k, v, cu = ref.gather(pool, 0, np.zeros((0, 1), np.int32), np.zeros(0, np.int32))
    assert k.shape == (0, 2, 3) and cu.tolist() == [0]
    ref.copy_blocks(pool, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert not pool.data.any()


def test_out_buffers_are_filled_and_returned():
    config = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=3, num_blocks=2, block_size=2)
    pool = pst.filled_pool(config, 0)
    slots = np.array([3, -1, 0])
    out = (np.full((3, 2, 3), np.nan, np.float32), np.full((3, 2, 3), np.nan, np.float32))
    k, v = ref.read(pool, 0, slots, out=out)
    assert k is out[0] and v is out[1]
    np.testing.assert_array_equal(k[0], view_token(pool, 0, 0, 3))
    assert not k[1].any() and not v[1].any()  # padding is zeroed, not left as it was
    k2, v2, _ = ref.gather(pool, 0, np.array([[1, 0]], np.int32), np.array([3], np.int32), out=out)
    assert k2 is out[0]
    np.testing.assert_array_equal(k2, ref.read(pool, 0, np.array([2, 3, 0]))[0])
