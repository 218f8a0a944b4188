"""The pool arithmetic, checked against offsets worked out by hand and against numpy's views."""

import doctest

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv import CacheConfig, KVPool
from pagedkv.geometry import layout
from pagedkv.geometry.layout import (
    K,
    V,
    cdiv,
    decode_offset,
    element_offset,
    make_strides,
    ragged_rows,
    split_slot,
    table_slot,
    token_base,
    token_slots,
)
from pagedkv.testing import strategies as pst

# L=2 layers, H=3 heads, D=4 dims, block_size=5, 6 blocks:
# block_stride = 5*3*4 = 60, kv_stride = 6*60 = 360, layer_stride = 720.
GEOMETRY = dict(num_layers=2, num_kv_heads=3, head_dim=4, num_blocks=6, block_size=5)


@pytest.mark.parametrize(
    "layout, pos_stride, head_stride, expected",
    [
        # layer 1, V, block 2, pos 3, head 1, dim 2
        ("NHD", 12, 4, 720 + 360 + 2 * 60 + 3 * 12 + 1 * 4 + 2),  # = 1242
        ("HND", 4, 20, 720 + 360 + 2 * 60 + 3 * 4 + 1 * 20 + 2),  # = 1234
    ],
)
def test_hand_computed_offsets(layout, pos_stride, head_stride, expected):
    s = CacheConfig(**GEOMETRY, layout=layout).strides
    assert (s.block_stride, s.kv_stride, s.layer_stride) == (60, 360, 720)
    assert (s.pos_stride, s.head_stride) == (pos_stride, head_stride)
    assert s.size == 2 * 720
    assert element_offset(s, 1, V, 2, 3, 1, 2) == expected
    slot = 2 * 5 + 3
    row = token_base(1, V, slot, s)
    assert row + 1 * s.head_stride + 2 == expected
    assert decode_offset(s, expected) == {
        "layer": 1, "kv": "V", "block": 2, "pos": 3, "head": 1, "dim": 2, "slot": slot,
    }


def test_first_and_last_element():
    for name in ("NHD", "HND"):
        s = CacheConfig(**GEOMETRY, layout=name).strides
        assert element_offset(s, 0, K, 0, 0, 0, 0) == 0
        assert element_offset(s, 1, V, 5, 4, 2, 3) == s.size - 1


def test_table_slot():
    tables = np.array([[7, 2, 9]])
    # position 6 of a sequence with block_size 4 is in its second block (2), offset 2
    assert table_slot(tables, 0, 6, 4) == 2 * 4 + 2
    positions = np.arange(12)
    assert table_slot(tables, np.zeros(12, int), positions, 4).tolist() == [
        28, 29, 30, 31, 8, 9, 10, 11, 36, 37, 38, 39]
    assert [split_slot(int(s), 4) for s in (28, 11)] == [(7, 0), (2, 3)]


def test_slots_and_ragged_rows_agree_with_a_plain_loop():
    rng = np.random.default_rng(0)
    tables = rng.integers(0, 50, (4, 6)).astype(np.int32)
    counts = np.array([3, 0, 7, 1])
    starts = np.array([0, 5, 10, 23])
    want = [int(tables[b, p // 4]) * 4 + p % 4 for b in range(4) for p in range(starts[b], starts[b] + counts[b])]
    assert token_slots(tables, starts, counts, 4).tolist() == want
    seq, offset = ragged_rows(counts)
    assert list(zip(seq.tolist(), offset.tolist(), strict=True)) == [(b, i) for b in range(4) for i in range(counts[b])]
    assert [cdiv(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_slots_do_not_overflow_int32():
    """A pool of more than 2**31 slots: int32 block ids times block_size must be computed in int64."""
    tables = np.array([[2**27 + 5]], np.int32)
    assert token_slots(tables, np.array([0]), np.array([1]), 64).tolist() == [(2**27 + 5) * 64]


def test_the_layout_docstrings_run():
    assert doctest.testmod(layout).failed == 0


def test_strides_are_all_integers_and_name_their_layout():
    for name in ("NHD", "HND"):
        s = CacheConfig(**GEOMETRY, layout=name).strides
        assert all(isinstance(x, int) for x in s) and s.layout == name
    one_head = dict(GEOMETRY, num_kv_heads=1)
    assert CacheConfig(**one_head, layout="HND").strides.layout == "NHD"  # one head: the same arrangement


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        make_strides(1, 1, 1, 1, 1, "DHN")


def test_decode_offset_out_of_range():
    s = CacheConfig(**GEOMETRY).strides
    with pytest.raises(IndexError):
        decode_offset(s, s.size)


@given(pst.configs(), st.data())
def test_views_agree_with_the_arithmetic(config, data):
    """pool.k(layer)[block, pos, head, d] (NHD) or [block, head, pos, d] (HND) is the number at element_offset."""
    pool = KVPool(config)
    pool.data[:] = np.arange(pool.data.size, dtype=np.float32)
    s = pool.strides
    layer = data.draw(st.integers(0, config.num_layers - 1))
    kv = data.draw(st.sampled_from([K, V]))
    block = data.draw(st.integers(0, config.num_blocks - 1))
    pos = data.draw(st.integers(0, config.block_size - 1))
    head = data.draw(st.integers(0, config.num_kv_heads - 1))
    d = data.draw(st.integers(0, config.head_dim - 1))
    view = (pool.k if kv == K else pool.v)(layer)
    assert np.shares_memory(view, pool.data)
    got = view[block, pos, head, d] if config.layout == "NHD" else view[block, head, pos, d]
    offset = element_offset(s, layer, kv, block, pos, head, d)
    assert got == offset
    coords = decode_offset(s, offset)
    assert (coords["layer"], coords["kv"], coords["block"], coords["pos"], coords["head"], coords["dim"]) == (
        layer, "KV"[kv], block, pos, head, d)
