"""Layer groups: models that mix full and sliding-window layers (Gemma 2/3, Mistral, gpt-oss).

Each group has its own block tables over the one pool; a sliding group gives back the
blocks that leave its window, and its attention never reads them. A small Gemma-like
transformer (even layers slide) generates the same tokens through the grouped cache as
through a dense cache that applies the same windows, on every backend.
"""

import numpy as np
import pytest

import pagedkv
from pagedkv import BlockManager, CacheConfig, LayerGroup, PagedKVCache, SlidingWindowManager
from pagedkv.testing.tolerance import attention_atol
from pagedkv.tools.model import ModelConfig, TinyLlama, generate_dense, generate_paged, paged_step

from .conftest import host

GEMMA_LIKE = ModelConfig(vocab_size=32, dim=16, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=4,
                         hidden_dim=32, sliding_window=6)


def config(**kw):
    base = dict(num_layers=4, num_kv_heads=1, head_dim=2, num_blocks=8, block_size=4)
    return CacheConfig(**{**base, **kw})


# -- the configuration ----------------------------------------------------------------------

def test_groups_share_planes_of_the_pool():
    c = config(layer_groups=[LayerGroup((0, 2), 8), ((1, 3), None)])
    assert c.num_planes == 2 and [c.plane_of(i) for i in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert c.bytes_per_block == config(num_layers=2).bytes_per_block  # two planes, not four layers
    assert config().layer_groups == (LayerGroup((0, 1, 2, 3)),) and config().num_planes == 4
    pool = pagedkv.KVPool(c)
    assert pool.k(1).shape == (8, 4, 1, 2)
    with pytest.raises(pagedkv.LayerIndexError, match="planes"):
        pool.k(2)


@pytest.mark.parametrize("groups, match", [
    ([((0, 1), None), ((1, 2, 3), 4)], "layer 1 is in layer groups 0 and 1"),
    ([((0, 1), None), ((2,), 4)], r"layers \[3\] are in no layer group"),
    ([((0, 1, 2, 3, 4), None)], "names layer 4"),
    ([((0, 1), None), ((2, 3), 0)], "sliding_window must be an integer in 1..32"),
    ([((0, 1), None), ((2, 3), 33)], "sliding_window must be an integer in 1..32"),
    ([((0, 1), None), ((2, 3), 2.5)], "sliding_window"),
    ([((0, 1), None), ((), 4), ((2, 3),)], "must name at least one layer"),
    ([((0, True), None), ((2, 3, 1),)], "names layer True"),
    ([], "non-empty"),
    ("full", "non-empty sequence"),
])
def test_bad_groups_are_refused_at_construction(groups, match):
    with pytest.raises(pagedkv.ConfigError, match=match):
        config(layer_groups=groups)


def test_memory_budget_with_groups():
    groups = [((0, 2), 64), ((1, 3), None)]
    c = CacheConfig.from_memory_budget(10_000, num_layers=4, num_kv_heads=1, head_dim=2, block_size=4,
                                       layer_groups=groups)
    assert c.memory_bytes <= 10_000 < c.memory_bytes + c.bytes_per_block and c.num_planes == 2


# -- the kernels skip what left the window ----------------------------------------------------

def test_null_entries_before_the_window_are_never_read(backend):
    c = config(num_layers=1, num_blocks=8, num_kv_heads=2, head_dim=4)
    pool = pagedkv.KVPool(c, device=backend.DEVICE)
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((20, 2, 4)).astype(np.float32)
    backend.write(pool, 0, kv, kv, np.arange(20, dtype=np.int64))
    q = rng.standard_normal((1, 4, 4)).astype(np.float32)
    lens = np.array([20], np.int32)
    full = backend.paged_attention(q, pool, 0, np.array([[0, 1, 2, 3, 4]], np.int32), lens, sliding_window=6)
    freed = backend.paged_attention(q, pool, 0, np.array([[-1, -1, -1, 3, 4]], np.int32), lens, sliding_window=6)
    np.testing.assert_array_equal(np.asarray(host(full)), np.asarray(host(freed)))
    with pytest.raises(pagedkv.BlockIndexError, match="inside the window"):  # block 3 holds position 14
        backend.paged_attention(q, pool, 0, np.array([[-1, -1, -1, -1, 4]], np.int32), lens, sliding_window=6)
    with pytest.raises(pagedkv.BlockIndexError, match="null entry"):  # gather reads every position
        backend.gather(pool, 0, np.array([[-1, -1, -1, 3, 4]], np.int32), lens)
    with pytest.raises(pagedkv.BlockIndexError, match="null entry"):  # no window, no null entry
        backend.paged_attention(q, pool, 0, np.array([[-1, -1, -1, 3, 4]], np.int32), lens)
    plan = backend.plan(pool, block_tables=np.array([[-1, -1, -1, 3, 4]], np.int32), context_lens=lens,
                        sliding_window=6)
    with pytest.raises(pagedkv.StepError, match="sliding_window <= 6"):
        backend.attention_step(q, pool, 0, plan, sliding_window=7)


# -- the block manager of a sliding group ---------------------------------------------------------

def test_a_window_makes_its_own_manager():
    """A sliding window is a manager class of its own (vLLM's SlidingWindowManager beside the
    full-attention one); BlockManager(..., sliding_window=W) makes one, as it always did."""
    sliding = BlockManager(4, num_blocks=8, sliding_window=6)
    assert type(sliding) is SlidingWindowManager and sliding.sliding_window == 6
    assert type(SlidingWindowManager(4, num_blocks=8, sliding_window=3)) is SlidingWindowManager
    full = BlockManager(4, num_blocks=8)
    assert type(full) is BlockManager and full.sliding_window is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(pagedkv.ConfigError, match="sliding_window"):
            BlockManager(4, num_blocks=8, sliding_window=bad)
    with pytest.raises(pagedkv.ConfigError, match="sliding_window"):
        SlidingWindowManager(4, num_blocks=8)
    cache = pagedkv.PagedKVCache(pagedkv.CacheConfig(
        num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=8, block_size=4,
        layer_groups=[pagedkv.LayerGroup((0,), 6), pagedkv.LayerGroup((1,))]), "numpy")
    assert [type(m) for m in cache.managers] == [SlidingWindowManager, BlockManager]


def test_a_sliding_manager_frees_what_left_the_window():
    m = BlockManager(4, num_blocks=16, sliding_window=6)
    s = m.add_sequence()
    m.append(s, 20)
    assert m.block_table(s) == [0, 1, 2, 3, 4]  # the prefill's own queries read from position 0
    m.append(s, 1)  # the query at 20 reads 15..20: blocks 0..2 are gone
    assert m.block_table(s)[:3] == [-1, -1, -1] and m.blocks_held() == 3
    for _ in range(40):
        m.append(s, 1)
        m.check()
    assert m.blocks_held() <= 3  # bounded by the window, whatever the length
    with pytest.raises(pagedkv.ArgumentError, match="left the sliding window"):
        m.truncate(s, 30)
    assert m.context_len(s) == 61
    m.truncate(s, 59)  # a rollback of speculative tokens stays inside the window
    child = m.fork(s)
    m.free(s)
    m.free(child)
    m.check()
    assert m.blocks_held() == 0


def test_a_sliding_prefix_hit_needs_only_the_blocks_in_its_window():
    pool = pagedkv.BlockPool(12)
    sliding = BlockManager(4, pool, sliding_window=6)
    full = BlockManager(4, pool, sliding_window=None)
    prompt = list(range(21))
    s = sliding.add_sequence(prompt_token_ids=prompt)
    sliding.append(s, 20)
    sliding.append(s, 1)  # the query at 20 reads 15..20: blocks 0..2 go idle (cached), the oldest
    sliding.free(s)
    f = full.add_sequence(prompt_token_ids=prompt)
    full.append(f, 21)
    full.free(f)  # each group: five full blocks cached and idle, one partial block free
    other = BlockManager(4, pool)
    other.append(other.add_sequence(), 16)  # two free blocks, then evicts the two oldest idle: sliding's 2, 1
    keys = sliding.prefix_cache.prompt_keys(prompt, ())
    assert sliding.prefix_cache.longest_hit(keys) == 1  # under the full-attention rule: block 1 is gone
    # the next token (20) reads positions 15..20, blocks 3 and 4, still cached: the whole prefix hits
    assert sliding.cached_prefix_blocks(prompt) == 5 and full.cached_prefix_blocks(prompt) == 5
    s = sliding.add_sequence(prompt_token_ids=prompt)
    assert sliding.num_cached_tokens(s) == 20 and sliding.block_table(s)[:3] == [-1, -1, -1]
    sliding.check()
    assert full.cached_prefix_blocks(prompt, limit=2) == 2


# -- the cache: groups end to end ------------------------------------------------------------------

def test_a_gemma_like_model_equals_dense(backend):
    model = TinyLlama(GEMMA_LIKE)
    cache = PagedKVCache(model.cache_config(24, block_size=4), backend=backend.NAME)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]
    want, want_logits = generate_dense(model, prompt, 6)
    got, got_logits = generate_paged(model, cache, prompt, 6)
    assert got == want
    np.testing.assert_allclose(got_logits, want_logits, atol=100 * attention_atol(len(prompt) + 6, 4, 4.0))
    cache.end_step()
    again, _ = generate_paged(model, cache, prompt + want[:2], 3)  # a prefix hit in both groups
    assert again == generate_dense(model, prompt + want[:2], 3)[0]
    assert cache.stats()["prefix_hits"] == 4
    for m in cache.managers:
        m.check()


def test_sliding_layers_hold_a_bounded_number_of_blocks():
    model = TinyLlama(GEMMA_LIKE)
    cache = PagedKVCache(model.cache_config(40, block_size=4), backend="numba", enable_prefix_caching=False)
    seq = cache.add_sequence().seq_id
    paged_step(model, cache, [seq], [list(range(10))])
    for t in range(40):
        step = cache.begin_step([seq], [1], token_ids=[[t % 32]])
        for layer in range(4):
            cache.write(layer, np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32), step)
        cache.end_step(step)
    sliding, full = cache.stats()["blocks_per_group"]
    assert full == 13 and sliding <= 3  # 50 tokens: all of them, and the window of 6
    assert (step.groups[0].block_tables[0, :10] == -1).all()
    with pytest.raises(pagedkv.StepError, match="sliding_window <= 6"):
        cache.attention(0, np.zeros((1, 4, 4), np.float32), step, sliding_window=8)
    cache.attention(0, np.zeros((1, 4, 4), np.float32), step, sliding_window=3)  # a smaller window reads less


def test_a_step_takes_blocks_for_every_group_or_none():
    c = config(num_blocks=5, layer_groups=[((0, 2), 4), ((1, 3), None)])
    cache = PagedKVCache(c, backend="numpy")
    a = cache.add_sequence().seq_id
    cache.begin_step([a], [8])  # two blocks in each group: four of five
    before = (cache.stats(), [m.block_table(a) for m in cache.managers])
    assert not cache.can_step([a], [4])
    with pytest.raises(pagedkv.OutOfBlocksError, match="layer groups"):
        cache.begin_step([a], [4])  # one more block for each group: the second would not fit
    assert (cache.stats(), [m.block_table(a) for m in cache.managers]) == before
    assert cache.can_step([a], [0])


def test_truncate_is_checked_in_every_group_before_any_moves():
    c = config(num_blocks=12, layer_groups=[((1, 3), None), ((0, 2), 4)])
    cache = PagedKVCache(c, backend="numpy")
    a = cache.add_sequence().seq_id
    cache.begin_step([a], [12])
    cache.begin_step([a], [1])  # the window of 4 at position 12 reads 9..12: blocks 0 and 1 go
    with pytest.raises(pagedkv.ArgumentError, match="sliding window"):
        cache.truncate(a, 5)
    assert [m.context_len(a) for m in cache.managers] == [13, 13]
    assert cache.truncate(a, 11) == 0  # the full group's fourth block is shared by no one: returned at step end
    cache.end_step()
    assert [m.context_len(a) for m in cache.managers] == [11, 11]


def test_stores_back_every_group():
    c = config(layer_groups=[((0, 2), 4), ((1, 3), None)])
    with PagedKVCache(c, backend="numpy", stores=[pagedkv.offload.stores.HostStore(1 << 20)], model_id="tiny") as cache:
        assert len(cache.tiers.groups) == 2  # a side per group (tests/test_stores.py loads through them)
        keys = [g.store_key(pagedkv.blocks.prefix_key.block_key(None, [1, 2, 3, 4])) for g in cache.tiers.groups]
        assert keys[0].digest != keys[1].digest and keys[0].token_ids == keys[1].token_ids


def test_kv_events_name_the_layer_group():
    c = config(num_blocks=12, layer_groups=[((1, 3), None), ((0, 2), 4)])
    cache = PagedKVCache(c, backend="numpy")
    log = pagedkv.EventLog()
    cache.manager.block_pool.subscribe(log)
    a = cache.add_sequence(prompt_token_ids=list(range(9))).seq_id
    cache.begin_step([a], [9])
    cache.begin_step([a], [1], token_ids=[[5]])  # the sliding group lets blocks 0 and 1 go idle: still cached
    stored = [e for e in log.take() if isinstance(e, pagedkv.BlockStored)]
    assert sorted((e.group, e.token_ids) for e in stored) == [
        (0, (0, 1, 2, 3)), (0, (4, 5, 6, 7)), (1, (0, 1, 2, 3)), (1, (4, 5, 6, 7))]
    assert {e.namespace for e in stored if e.group == 0} != {e.namespace for e in stored if e.group == 1}
    cache.reset()
    assert {e.namespace for e in log.take() if isinstance(e, pagedkv.AllBlocksCleared)} == \
        {e.namespace for e in stored}
