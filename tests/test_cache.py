"""PagedKVCache end to end: a small transformer generates the same tokens through it as with
a plain contiguous cache, on every backend (cuda under the simulator, with a tiny model)."""

import numpy as np
import pytest

import pagedkv
from pagedkv import PagedKVCache
from pagedkv.testing.tolerance import attention_atol
from pagedkv.tools.model import ModelConfig, TinyLlama, generate_dense, generate_paged, paged_step

from .conftest import host

TINY = ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, hidden_dim=32)


def test_generation_through_the_cache_equals_dense(backend):
    model = TinyLlama(TINY)
    cache = PagedKVCache(model.cache_config(16, block_size=4), backend=backend.NAME)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    want, want_logits = generate_dense(model, prompt, 4)
    got, got_logits = generate_paged(model, cache, prompt, 4)
    assert got == want
    # Logits are attention outputs (within attention_atol of float64) carried through the
    # output projection and two more layers, each summing up to 32 terms with weights
    # of order 1: allow 100x the attention bound. A wrong token or position moves them by O(1).
    np.testing.assert_allclose(got_logits, want_logits, atol=100 * attention_atol(len(prompt) + 4, 4, 4.0))
    again, _ = generate_paged(model, cache, prompt, 4)  # the prompt's full blocks now come from the cache
    assert again == want and cache.stats()["prefix_hits"] == 2
    cache.manager.check()


def test_batched_steps_fork_and_truncate():
    model = TinyLlama(TINY)
    cache = PagedKVCache(model.cache_config(32, block_size=4), backend="numba")
    a, _ = cache.add_sequence(prompt_token_ids=[1, 2, 3, 4, 5, 6])
    b, _ = cache.add_sequence(prompt_token_ids=[7, 8])
    logits = paged_step(model, cache, [a, b], [[1, 2, 3, 4, 5, 6], [7, 8]])  # a mixed prefill step
    assert logits.shape == (2, TINY.vocab_size)
    c = cache.fork(a)
    step = cache.begin_step([a, c], [1, 1], token_ids=[[9], [10]])
    assert step.is_decode and step.copies[0].size == 1  # the shared, half-filled block is copied once
    assert step.positions.tolist() == [6, 6]
    cache.end_step(step)
    cache.truncate(c, 3)
    assert cache.manager.context_len(c) == 3
    assert cache.free(c) == 0  # its one block is a's first block too
    assert cache.free(a) == 2  # the first is cached (it waits idle), the second plainly free
    cache.manager.check()


def test_frees_during_an_open_step_wait_for_its_end(backend):
    """vLLM #45357: a sequence freed (or truncated) while its step's writes may still be in
    flight keeps its blocks until end_step, so no new sequence gets them under that write;
    the step stays valid for the other sequences."""
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=4, block_size=2)
    cache = PagedKVCache(config, backend=backend.NAME)
    a, b = cache.add_sequence().seq_id, cache.add_sequence().seq_id
    step = cache.begin_step([a, b], [2, 4])  # 3 of the 4 blocks
    assert cache.free(b) == 0 and cache.truncate(a, 0) == 0  # held back, not returned
    d = cache.add_sequence().seq_id
    assert cache.stats()["blocks_used"] == 3 and not cache.can_step([d], [4])  # one block free, not three
    kv = np.arange(6, dtype=np.float32).reshape(6, 1, 1)
    cache.write(0, kv, kv, step)  # still valid: its blocks are still its own
    cache.manager.check()
    assert cache.end_step(step) == 3  # b's two blocks and a's one
    assert cache.stats()["blocks_used"] == 0 and cache.can_step([d], [8])
    with pytest.raises(pagedkv.StepError, match="not the open one"):
        cache.end_step(step)
    cache.free(d)
    cache.manager.check()


def test_step_positions_for_a_mixed_batch():
    cache = PagedKVCache(TinyLlama(TINY).cache_config(8, block_size=4), backend="numpy")
    a, _ = cache.add_sequence()
    b, _ = cache.add_sequence()
    cache.begin_step([a], [3])
    step = cache.begin_step([a, b], [1, 2])
    assert step.positions.tolist() == [3, 0, 1] and not step.is_decode


def test_out_of_blocks_changes_nothing():
    cache = PagedKVCache(TinyLlama(TINY).cache_config(2, block_size=4), backend="numpy")
    a, _ = cache.add_sequence()
    cache.begin_step([a], [5])
    with pytest.raises(pagedkv.OutOfBlocksError):
        cache.begin_step([a], [4])
    assert cache.manager.context_len(a) == 5 and not cache.can_step([a], [4])


def test_config_is_required():
    with pytest.raises(pagedkv.ConfigError):
        PagedKVCache("big")


def test_a_stale_step_cannot_poison_a_cached_prefix(backend):
    """A step kept past free() would write into blocks that now hold another request's
    prefix-cached tokens; it is refused, and the cached K/V stay intact."""
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=2, block_size=4)
    cache = PagedKVCache(config, backend=backend.NAME)
    a, _ = cache.add_sequence()
    old = cache.begin_step([a], [4])
    cache.free(a)
    b, _ = cache.add_sequence(prompt_token_ids=[1, 2, 3, 4, 5])
    step = cache.begin_step([b], [5], token_ids=[[1, 2, 3, 4, 5]])
    kv = np.arange(1, 6, dtype=np.float32).reshape(5, 1, 1)
    cache.write(0, kv, kv, step)
    with pytest.raises(pagedkv.StepError, match="stale"):
        cache.write(0, -np.ones((4, 1, 1), np.float32), -np.ones((4, 1, 1), np.float32), old)
    with pytest.raises(pagedkv.StepError, match="stale"):
        cache.attention(0, np.ones((4, 1, 1), np.float32), old)
    cache.free(b)
    c, cached = cache.add_sequence(prompt_token_ids=[1, 2, 3, 4, 9])
    assert cached == 4
    table = cache.manager.block_tables([c])
    k, _, _ = backend.gather(cache.pool, 0, table, np.array([4], np.int32))
    assert host(k).ravel().tolist() == [1, 2, 3, 4]  # the cached prefix, not the stale write


def test_a_step_of_another_cache_is_refused():
    config = TinyLlama(TINY).cache_config(8, block_size=4)
    one, other = PagedKVCache(config, backend="numpy"), PagedKVCache(config, backend="numpy")
    step = other.begin_step([other.add_sequence().seq_id], [1])
    kv = np.ones((1, TINY.num_kv_heads, TINY.head_dim), np.float32)
    with pytest.raises(pagedkv.StepError, match="not made by this cache"):
        one.write(0, kv, kv, step)


def test_close_gives_everything_back():
    config = TinyLlama(TINY).cache_config(8, block_size=4)
    with PagedKVCache(config, backend="numpy") as cache:
        cache.begin_step([cache.add_sequence(prompt_token_ids=list(range(9))).seq_id], [9],
                         token_ids=[list(range(9))])
        assert cache.manager.block_pool.num_used == 3
    assert cache.manager.block_pool.num_free == 8 and cache.manager.block_pool.num_cached == 0
