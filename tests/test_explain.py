"""PagedKVCache.explain_prefix: each cause of a prefix miss, explained block by block, and reading
it changes nothing (no recency, no counts, no store reads)."""

import pytest

from pagedkv import CacheConfig, EventLog, LayerGroup, PagedKVCache
from pagedkv.offload.stores import HostStore

BS = 4


def config(num_blocks=16, **kw):
    return CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=BS, **kw)


def compute(cache, prompt, salt=None):
    """Run a prompt's step (its blocks enter the prefix cache) and free it (they stay cached)."""
    seq = cache.add_sequence(prompt_token_ids=prompt, cache_salt=salt)
    n = len(prompt) - seq.num_cached_tokens
    cache.begin_step([seq.seq_id], [n], token_ids=[prompt[seq.num_cached_tokens:]])
    cache.end_step()
    cache.free(seq.seq_id)


def sources(explanation):
    return [b.source for b in explanation.blocks]


PROMPT = list(range(1, 15))  # 14 tokens: three full blocks and a partial one of 2


def test_pool_blocks_and_the_partial_last_block():
    cache = PagedKVCache(config(), "numpy")
    compute(cache, PROMPT)
    e = cache.explain_prefix(PROMPT)
    assert sources(e) == ["pool", "pool", "pool", "last"]
    assert [b.block_id is not None for b in e.blocks[:3]] == [True] * 3 and all(b.usable for b in e.blocks[:3])
    assert e.blocks[3].first_token == 12 and e.blocks[3].num_tokens == 2 and "2 tokens short" in e.blocks[3].detail
    assert e.num_cached_tokens == 12 == cache.add_sequence(prompt_token_ids=PROMPT).num_cached_tokens
    whole = cache.explain_prefix(PROMPT[:12])  # a prompt of whole blocks: its last one holds the last token
    assert sources(whole) == ["pool", "pool", "last"] and "last token" in whole.blocks[2].detail
    assert "12 of 14 prompt tokens cached" in str(e)


def test_reading_changes_nothing():
    store = HostStore(1 << 20)
    cache = PagedKVCache(config(), "numpy", stores=[store], model_id="m")
    compute(cache, PROMPT)
    log = EventLog()
    cache.manager.block_pool.subscribe(log)
    before, store_before = cache.stats(), store.stats()
    other = PagedKVCache(config(), "numpy", stores=[store], model_id="m")
    for c in (cache, other):
        c.explain_prefix(PROMPT + [99, 98, 97, 96])
    assert cache.stats() == before and store.stats() == store_before and log.take() == []
    assert other.stats()["prefix_hits"] == other.stats()["prefix_misses"] == 0


def test_evicted_blocks_say_when():
    cache = PagedKVCache(config(num_blocks=4), "numpy")  # 16 slots: a second prompt evicts the first
    compute(cache, PROMPT)
    compute(cache, [50 + t for t in range(14)])
    e = cache.explain_prefix(PROMPT)
    assert "evicted" in sources(e) and e.num_cached_tokens == 0
    evicted = [b for b in e.blocks if b.source == "evicted"]
    assert all(b.evicted_at is not None and b.given_to_stores is False for b in evicted)
    assert "left the pool" in evicted[0].detail and "no store" in evicted[0].detail


def test_a_store_serves_what_the_pool_lost():
    store = HostStore(1 << 20)
    first = PagedKVCache(config(), "numpy", stores=[store], model_id="m")
    compute(first, PROMPT)
    first.close()
    second = PagedKVCache(config(), "numpy", stores=[store], model_id="m")
    e = second.explain_prefix(PROMPT)
    assert sources(e) == ["store", "store", "store", "last"] and e.blocks[0].tier == "host"
    assert e.num_cached_tokens == 12 == second.add_sequence(prompt_token_ids=PROMPT).num_cached_tokens
    another_model = PagedKVCache(config(), "numpy", stores=[store], model_id="other")
    assert sources(another_model.explain_prefix(PROMPT))[:3] == ["never_seen"] * 3


def test_another_salt_is_named_only_where_it_may_be():
    cache = PagedKVCache(config(), "numpy")
    compute(cache, PROMPT, salt="alice")
    assert sources(cache.explain_prefix(PROMPT, "alice"))[:3] == ["pool"] * 3
    assert sources(cache.explain_prefix(PROMPT, "bob"))[:3] == ["other_salt"] * 3
    assert sources(cache.explain_prefix(PROMPT, "bob", reveal_other_salts=False))[:3] == ["never_seen"] * 3


def test_blocks_before_a_sliding_window_are_not_needed():
    cache = PagedKVCache(config(layer_groups=[LayerGroup((0, 1), 5)]), "numpy")  # every layer slides, window 5
    long = list(range(1, 23))  # 22 tokens: five full blocks and a partial one
    compute(cache, long)
    e = cache.explain_prefix(long)
    assert sources(e) == ["outside_window"] * 4 + ["pool", "last"]  # the next query, at 20, sees 16-20
    assert e.num_cached_tokens == 20 == cache.add_sequence(prompt_token_ids=long).num_cached_tokens


def test_never_seen_and_caching_off():
    cache = PagedKVCache(config(), "numpy")
    assert sources(cache.explain_prefix(PROMPT)) == ["never_seen"] * 3 + ["last"]
    compute(cache, PROMPT)
    cache.reset()
    assert "since its prefix cache was reset" in cache.explain_prefix(PROMPT).blocks[0].detail
    off = PagedKVCache(config(), "numpy", enable_prefix_caching=False)
    e = off.explain_prefix(PROMPT)
    assert sources(e) == ["never_seen"] * 3 + ["last"] and "off" in e.blocks[0].detail


def test_a_cached_block_after_a_miss_is_not_taken():
    """Keys chain, but a prompt takes a run from its start: a prompt whose first block differs
    finds nothing, and one whose middle block was never computed takes the blocks before it."""
    cache = PagedKVCache(config(), "numpy")
    compute(cache, PROMPT)
    changed = PROMPT[:4] + [77, 78, 79, 80] + PROMPT[8:]
    e = cache.explain_prefix(changed)
    assert sources(e)[:3] == ["pool", "never_seen", "never_seen"] and e.num_cached_tokens == 4


@pytest.mark.parametrize("salt", [None, "t"])
def test_the_explanation_agrees_with_add_sequence(salt):
    cache = PagedKVCache(config(num_blocks=6), "numpy")
    prompts = [PROMPT, PROMPT[:9] + [40, 41, 42], [60, 61, 62, 63, 64, 65]]
    for p in prompts:
        compute(cache, p, salt)
    for p in prompts + [PROMPT + [5, 5, 5, 5]]:
        e = cache.explain_prefix(p, salt)
        assert e.num_cached_tokens == sum(b.num_tokens for b in e.blocks if b.usable)
        seq = cache.add_sequence(prompt_token_ids=p, cache_salt=salt)
        assert seq.num_cached_tokens == e.num_cached_tokens
        cache.free(seq.seq_id)


def test_a_store_holding_the_tokens_in_another_format_says_so():
    """A bfloat16 pool wrote the prompt's blocks to a shared store; a float32 pool of the same model
    finds none of them usable, and is told why."""
    store = HostStore(1 << 20)
    writer = PagedKVCache(config(dtype="bfloat16"), "numpy", stores=[store], model_id="m")
    compute(writer, PROMPT)
    writer.close()
    reader = PagedKVCache(config(), "numpy", stores=[store], model_id="m")
    e = reader.explain_prefix(PROMPT)
    assert sources(e) == ["other_format"] * 3 + ["last"] and e.num_cached_tokens == 0
    assert "as bfloat16, NHD" in e.blocks[0].detail and "host store" in e.blocks[0].detail
