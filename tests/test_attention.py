"""paged_attention: every backend against the float64 reference, and the reference against dense attention.

The tolerance between a float32 backend and the float64 reference is derived
in pagedkv.testing.tolerance (about 8 * 2**-24 * (positions + D) * max|V|):
not tuned to pass, and far below what any indexing bug produces.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pagedkv as pk
from pagedkv import CacheConfig, KVPool
from pagedkv.testing import strategies as pst
from pagedkv.testing.tolerance import assert_attention_close, score_bound, storage_atol

from .conftest import ALL_FORMATS, INPUT_KINDS, as_input, host, on_device

ref = pk.get_backend("numpy")


def kv_max(pool, layer):
    """max |K|, |V| of a layer, as decoded (the numbers attention works with)."""
    return float(max(np.abs(pool.k_decoded(layer)).max(), np.abs(pool.v_decoded(layer)).max()))


@st.composite
def attention_case(draw, config):
    tables, lens = draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=3))
    group = draw(st.integers(1, 3))
    varlen = draw(st.booleans())
    query_lens = None
    rows = len(lens)
    if varlen:
        # at most 4 queries a sequence: every case shape, at a size the CUDA simulator runs quickly
        query_lens = np.array([draw(st.integers(0, min(int(n), 4))) for n in lens], dtype=np.int32)
        rows = int(query_lens.sum())
    options = dict(
        query_lens=query_lens,
        sliding_window=draw(st.none() | st.integers(1, 6)),
        soft_cap=draw(st.none() | st.floats(0.5, 30.0)),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
    )
    return tables, lens, rows, config.num_kv_heads * group, options


def _query_rows(lens, query_lens):
    """``(sequence, position)`` of each query row: the last ``query_lens[b]`` positions of sequence b
    (decode: its last one)."""
    counts = np.ones_like(lens) if query_lens is None else query_lens
    return [(b, int(lens[b]) - int(counts[b]) + j) for b in range(len(lens)) for j in range(int(counts[b]))]


def _poison(pool, layer, tables, lens, data, seed):
    """Maybe (drawn) write one token whose K or V holds a NaN or an infinity, at a random position of
    a random sequence; returns its slot (None: nothing written). Blocks may be shared, so the slot
    may be seen by other sequences' queries too."""
    filled = [b for b in range(len(lens)) if lens[b] > 0]
    if not filled or not data.draw(st.booleans(), label="poison"):
        return None
    b = data.draw(st.sampled_from(filled), label="poisoned sequence")
    p = data.draw(st.integers(0, int(lens[b]) - 1), label="poisoned position")
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="non-finite")
    slot = int(tables[b, p // pool.config.block_size]) * pool.config.block_size + p % pool.config.block_size
    key, value = pst.token_arrays(pool.config, 1, seed)
    x = key if data.draw(st.booleans(), label="in K") else value
    x.reshape(-1)[data.draw(st.integers(0, x.size - 1), label="where")] = bad
    ref.write(pool, layer, key, value, np.array([slot], np.int64))
    return slot, bad


def _seen(rows, tables, slot, block_size, window):
    """Whether each query row sees ``slot`` (within its causal limit and window)."""
    seen = []
    for b, pos in rows:
        first = max(0, pos - window + 1) if window else 0
        slots = [int(tables[b, i // block_size]) * block_size + i % block_size for i in range(first, pos + 1)]
        seen.append(slot in slots)
    return np.array(seen, dtype=bool)


def _assert_agree_around_poison(actual, expected, poison, rows, tables, block_size, window, close):
    """Rows that do not see the poisoned slot: finite on both sides and close (a masked position
    contributes nothing, NaN or not). Rows that see a NaN: NaN in the same numbers."""
    seen = np.zeros(len(rows), bool) if poison is None else _seen(rows, tables, poison[0], block_size, window)
    clean = ~seen
    assert np.isfinite(expected[clean]).all() and np.isfinite(actual[clean]).all()
    close(actual[clean], expected[clean])
    if poison is not None and np.isnan(poison[1]):
        np.testing.assert_array_equal(np.isnan(actual[seen]), np.isnan(expected[seen]))


@pytest.mark.parametrize("dtype", ["float32", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("where", ["before the window", "after the query"])
def test_a_non_finite_number_a_query_does_not_see_contributes_nothing(backend, dtype, where):
    """A NaN (what fp8_e4m3 stored for any |x| > 448) in K and V at a position a query must not see:
    before its sliding window (decode), or after it (causal prefill). Before, 0 x NaN turned the
    reference's output NaN in both cases and the numba prefill's in the second, while the numba
    decode gave the right numbers: the backends disagreed."""
    config = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=6, block_size=4, dtype=dtype)
    pool = KVPool(config)
    key, value = pst.token_arrays(config, 20, 0)
    bad = 3 if where == "before the window" else 15
    key[bad], value[bad] = np.nan, np.nan
    ref.write(pool, 0, key, value, np.arange(20, dtype=np.int64))
    tables, lens = np.array([[0, 1, 2, 3, 4]], np.int32), np.array([20], np.int32)
    if where == "before the window":
        q, options = np.ones((1, 4, 4), np.float32), dict(sliding_window=8)
    else:
        q, options = np.ones((16, 4, 4), np.float32), dict(query_lens=np.array([16], np.int32))
    out = host(backend.paged_attention(q, on_device(pool, backend), 0, tables, lens, **options))
    if where == "after the query":
        assert np.isnan(out[11:]).all()  # rows at positions 15.. see it: NaN, as documented
        out = out[:11]
    assert np.isfinite(out).all()
    clean = KVPool(config)  # the same without the poisoned position: what the visible ones give
    key[bad], value[bad] = 0.0, 0.0
    ref.write(clean, 0, key, value, np.arange(20, dtype=np.int64))
    want = ref.paged_attention(q, clean, 0, tables, lens, **options)[:len(out)]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@given(st.data(), st.integers(0, 2**32 - 1))
def test_backends_agree_with_the_reference(fast_backend, monkeypatch, data, seed):
    """In every storage format: both sides decode the same exact values, so the float32
    tolerance holds unchanged. On cuda, split-K cuts some cases' contexts and not others."""
    if fast_backend.NAME == "cuda":
        monkeypatch.setattr(fast_backend, "SPLIT_POSITIONS", data.draw(st.integers(4, 12), label="split_positions"))
    config = data.draw(pst.configs(max_layers=2, max_kv_heads=2, max_head_dim=8, max_blocks=6, max_block_size=4,
                                   dtypes=ALL_FORMATS), label="config")
    host_pool = pst.filled_pool(config, seed)
    tables, lens, rows, hq, options = data.draw(attention_case(config))
    layer = data.draw(st.integers(0, config.num_layers - 1))
    largest = kv_max(host_pool, layer)  # the bound of the finite numbers, taken before any poison
    poison = _poison(host_pool, layer, tables, lens, data, seed + 2)
    q = np.random.default_rng(seed + 1).standard_normal((rows, hq, config.head_dim), dtype=np.float32)
    expected = ref.paged_attention(q, host_pool, layer, tables, lens, **options)
    kind = data.draw(st.sampled_from(INPUT_KINDS), label="input kind")
    actual = host(fast_backend.paged_attention(as_input(q, kind), on_device(host_pool, fast_backend), layer,
                                               as_input(tables, kind), as_input(lens, kind), **options))
    assert actual.shape == expected.shape and actual.dtype == np.float32
    largest = max(largest, float(np.abs(np.nan_to_num(pst.token_arrays(config, 1, seed + 2)[0])).max()))
    scale = options["scale"] or 1 / np.sqrt(config.head_dim)

    def close(a, e):
        assert_attention_close(a, e, int(lens.max(initial=0)), config.head_dim, largest,
                               score_bound(config.head_dim, scale, float(np.abs(q).max(initial=0)), largest))
    _assert_agree_around_poison(actual, expected, poison, _query_rows(lens, options["query_lens"]), tables,
                                config.block_size, options["sliding_window"], close)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"])
@given(st.data(), st.integers(0, 2**32 - 1))
def test_a_narrow_format_is_within_its_rounding_of_float32(dtype, data, seed):
    """The same K/V written to a float32 pool and to a narrow one: attention differs by no more
    than the format's rounding allows (pagedkv.testing.tolerance.storage_atol)."""
    config = data.draw(pst.configs(max_layers=1, max_kv_heads=2, max_head_dim=8, max_blocks=6, max_block_size=4))
    narrow_config = CacheConfig(**{**{f: getattr(config, f) for f in (
        "num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "layout")}, "dtype": dtype})
    wide, narrow = KVPool(config), KVPool(narrow_config)
    slots = np.arange(config.num_slots, dtype=np.int64)
    key, value = pst.token_arrays(config, config.num_slots, seed)
    for pool in (wide, narrow):
        ref.write(pool, 0, key, value, slots)
    tables, lens, rows, hq, options = data.draw(attention_case(config))
    options.update(sliding_window=None, soft_cap=None)
    q = np.random.default_rng(seed + 1).standard_normal((rows, hq, config.head_dim), dtype=np.float32)
    want = ref.paged_attention(q, wide, 0, tables, lens, **options)
    got = ref.paged_attention(q, narrow, 0, tables, lens, **options)
    scale = options["scale"] or 1 / np.sqrt(config.head_dim)
    largest = kv_max(wide, 0)
    bound = storage_atol(narrow_config.format, largest, score_bound(config.head_dim, scale,
                                                                    float(np.abs(q).max(initial=0)), largest))
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)


def dense_attention(q, k, v, positions, scale, window=None, cap=None):
    """Attention over a contiguous cache, written independently of the pool: loops, float64."""
    rows, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros((rows, hq, d))
    for r, pos in enumerate(positions):
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(hq):
            kk, vv = k[lo:pos + 1, h // group].astype(np.float64), v[lo:pos + 1, h // group].astype(np.float64)
            s = kk @ q[r, h].astype(np.float64) * scale
            if cap is not None:
                s = cap * np.tanh(s / cap)
            w = np.exp(s - s.max())
            out[r, h] = w @ vv / w.sum()
    return out


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("window, cap", [(None, None), (5, None), (None, 20.0)])
def test_paged_equals_dense_attention(backend, layout, window, cap):
    """Tokens written at scattered slots give the attention of the same tokens held contiguously."""
    rng = np.random.default_rng(3)
    config = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=12, block_size=4, layout=layout)
    n = 21  # 6 blocks, the last partly filled
    k, v = pst.token_arrays(config, n, 5)
    blocks = rng.permutation(12)[:6]
    slots = (blocks[np.arange(n) // 4] * 4 + np.arange(n) % 4).astype(np.int64)
    host_pool = KVPool(config)
    ref.write(host_pool, 0, k, v, slots)
    pool = on_device(host_pool, backend)
    tables, lens = blocks[None].astype(np.int32), np.array([n], np.int32)
    scale = 0.3
    # decode: the newest token
    q = rng.standard_normal((1, 4, 8), dtype=np.float32)
    got = host(backend.paged_attention(q, pool, 0, tables, lens, scale=scale, sliding_window=window, soft_cap=cap))
    assert_attention_close(got, dense_attention(q, k, v, [n - 1], scale, window, cap), n, 8, float(np.abs(v).max()))
    # a chunk of the last 4 tokens (chunked prefill, or speculative verification), each causal
    q = rng.standard_normal((4, 4, 8), dtype=np.float32)
    got = host(backend.paged_attention(q, pool, 0, tables, lens, scale=scale, sliding_window=window,
                                       soft_cap=cap, query_lens=np.array([4], np.int32)))
    assert_attention_close(got, dense_attention(q, k, v, range(n - 4, n), scale, window, cap), n, 8,
                           float(np.abs(v).max()))


def test_empty_sequences_attend_to_nothing(backend):
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2, block_size=2)
    pool = on_device(pst.filled_pool(config, 0), backend)
    q = np.ones((2, 1, 2), np.float32)
    out = host(backend.paged_attention(q, pool, 0, np.array([[1], [-1]], np.int32), np.array([2, 0], np.int32)))
    assert np.isfinite(out).all() and not out[1].any() and out[0].any()


def test_softmax_is_shifted_so_large_scores_do_not_overflow(backend):
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=1, block_size=4)
    host_pool = KVPool(config)
    ref.write(host_pool, 0, np.full((3, 1, 2), 100.0, np.float32), np.arange(6, dtype=np.float32).reshape(3, 1, 2),
              np.array([0, 1, 2]))
    q = np.full((1, 1, 2), 100.0, np.float32)  # scores of 14142: exp overflows unshifted
    out = host(backend.paged_attention(q, on_device(host_pool, backend), 0, np.array([[0]], np.int32),
                                       np.array([3], np.int32)))
    np.testing.assert_allclose(out[0, 0], [2.0, 3.0], rtol=1e-6)  # equal scores: the mean of V


CONFIG = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2)
TABLES, LENS = np.array([[0, 1], [2, -1]], np.int32), np.array([3, 2], np.int32)
Q = np.ones((2, 4, 4), np.float32)

BAD = {
    "heads not a multiple": (dict(q=np.ones((2, 3, 4), np.float32)), pk.ShapeError, "multiple of the cache's 2"),
    "wrong head_dim": (dict(q=np.ones((2, 4, 5), np.float32)), pk.ShapeError, "[N, Hq, 4]"),
    "q float64": (dict(q=Q.astype(np.float64)), pk.DTypeError, "float32"),
    "q rows != sequences": (dict(q=Q[:1]), pk.ShapeError, "one query per sequence"),
    "context past table": (dict(lens=np.array([5, 2], np.int32)), pk.ContextLengthError, "context_lens[0] = 5"),
    "query_lens past context": (dict(query_lens=np.array([4, 0], np.int32), q=np.ones((4, 4, 4), np.float32)),
                                pk.ContextLengthError, "query_lens[0] = 4"),
    "query_lens int64": (dict(query_lens=np.array([1, 1])), pk.DTypeError, "int32"),
    "query_lens sum != rows": (dict(query_lens=np.array([1, 2], np.int32)), pk.ShapeError, "add up to 3"),
    "window 0": (dict(sliding_window=0), pk.ArgumentError, "sliding_window"),
    "negative cap": (dict(soft_cap=-1.0), pk.ArgumentError, "soft_cap"),
    "nan scale": (dict(scale=float("nan")), pk.ArgumentError, "finite"),
    "scale past float32": (dict(scale=1e39), pk.ArgumentError, "float32"),
    "scale that float32 rounds to 0": (dict(scale=1e-50), pk.ArgumentError, "float32"),
    "soft cap past float32": (dict(soft_cap=1e39), pk.ArgumentError, "float32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_attention_input(backend, case):
    changes, error, words = BAD[case]
    args = dict(q=Q, tables=TABLES, lens=LENS)
    args.update(changes)
    pool = on_device(pst.filled_pool(CONFIG, 0), backend)
    before = host(pool)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        backend.paged_attention(args.pop("q"), pool, 0, args.pop("tables"), args.pop("lens"), **args)
    np.testing.assert_array_equal(host(pool), before)


@given(st.data(), st.integers(0, 2**32 - 1))
def test_tiled_prefill_agrees_with_the_reference(data, seed):
    """The numba backend runs long query runs (prefill, chunked prefill) as tiles of up to
    TILE_ROWS rows (pagedkv.backends.numba.prefill), made small here so that these short
    sequences are cut too: tiles cut mid-sequence, padded widths and block sizes, GQA groups,
    windows, soft caps, empty sequences and every storage format."""
    from pagedkv.backends.numba import prefill as _numba_prefill

    numba = pk.get_backend("numba")
    config = data.draw(pst.configs(max_layers=1, max_kv_heads=2, max_head_dim=8, max_blocks=12, max_block_size=6,
                                   dtypes=ALL_FORMATS), label="config")
    host_pool = pst.filled_pool(config, seed)
    tables, lens = data.draw(pst.block_tables(config, max_seqs=3, max_blocks_per_seq=6), label="tables")
    query_lens = np.array([data.draw(st.integers(0, int(n))) for n in lens], dtype=np.int32)
    rows = int(query_lens.sum())
    if rows < 4 * len(lens):  # the tiled path runs from 4 query rows a sequence on average
        query_lens = lens.copy()
        rows = int(lens.sum())
    hq = config.num_kv_heads * data.draw(st.integers(1, 3), label="group")
    options = dict(query_lens=query_lens, sliding_window=data.draw(st.none() | st.integers(1, 9)),
                   soft_cap=data.draw(st.none() | st.floats(0.5, 30.0)))
    largest = kv_max(host_pool, 0)
    poison = _poison(host_pool, 0, tables, lens, data, seed + 2)  # at a masked position, or a visible one
    largest = max(largest, float(np.abs(np.nan_to_num(pst.token_arrays(config, 1, seed + 2)[0])).max()))
    q = np.random.default_rng(seed + 1).standard_normal((rows, hq, config.head_dim), dtype=np.float32)
    expected = ref.paged_attention(q, host_pool, 0, tables, lens, **options)
    with mock.patch.object(_numba_prefill, "TILE_ROWS", data.draw(st.sampled_from([1, 3, 16, 32]), label="tile rows")):
        actual = numba.paged_attention(q, host_pool, 0, tables, lens, **options)

    def close(a, e):
        assert_attention_close(a, e, int(lens.max(initial=0)), config.head_dim, largest,
                               score_bound(config.head_dim, 1 / np.sqrt(config.head_dim),
                                           float(np.abs(q).max(initial=0)), largest))
    _assert_agree_around_poison(actual, expected, poison, _query_rows(lens, query_lens), tables,
                                config.block_size, options["sliding_window"], close)


def test_tiles_cut_each_sequence_into_runs():
    from pagedkv.backends.numba.prefill import tiles

    first, rows = tiles(np.array([3, 0, 35, 16], np.int32), 16)
    assert first.tolist() == [0, 3, 19, 35, 38] and rows.tolist() == [3, 16, 16, 3, 16]
