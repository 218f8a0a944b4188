"""BlockPool: the free stack, per-owner reference counts, the prefix-cache index, errors, threads."""

import random
import threading

import pytest

from pagedkv import (
    AllBlocksCleared,
    AllocatorError,
    BlockIndexError,
    BlockManager,
    BlockPool,
    BlockRemoved,
    BlockStored,
    EventLog,
    InvariantError,
    OutOfBlocksError,
)


def test_llama_rs_page_allocator_scenario():
    a = BlockPool(4)
    b0, b1 = a.allocate(2)
    assert (a.num_free, a.num_used) == (2, 2)
    assert a.ref_count(b0) == a.ref_count(b1) == 1
    assert a.incref(b0) == 2
    assert a.decref(b0) == 1 and a.num_free == 2
    assert a.decref(b0) == 0 and a.num_free == 3
    a.free(b1)
    assert a.num_free == 4
    a.check()


def test_fragmentation_scenario():
    a = BlockPool(10)
    blocks = a.allocate(10)
    assert a.num_free == 0
    with pytest.raises(OutOfBlocksError):
        a.allocate(1)
    for b in blocks[:5]:
        a.free(b)
    again = a.allocate(5)
    assert sorted(again) == sorted(blocks[:5])
    for b in blocks[5:] + again:
        a.free(b)
    assert a.num_free == 10


def test_allocate_is_all_or_nothing():
    a = BlockPool(3)
    a.allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 blocks, 1 of 3 are free"):
        a.allocate(2)
    assert a.num_free == 1


def test_errors():
    a = BlockPool(3)
    (b,) = a.allocate(1)
    a.free(b)
    with pytest.raises(AllocatorError, match="freed twice"):
        a.free(b)
    with pytest.raises(AllocatorError, match="never allocated"):
        a.free(2)
    with pytest.raises(AllocatorError, match="free; only an allocated block"):
        a.incref(2)
    with pytest.raises(BlockIndexError):
        a.free(3)
    with pytest.raises(BlockIndexError):
        a.ref_count(-1)
    with pytest.raises(AllocatorError):
        BlockPool(0)
    with pytest.raises(AllocatorError, match="not cached"):
        a.take_cached(0)
    with pytest.raises(AllocatorError, match="only a held block can be cached"):
        a.cache(0, "key", 1)


def test_owners_release_only_what_they_hold():
    a = BlockPool(2)
    mine, theirs = a.new_owner(), a.new_owner()
    (b,) = a.allocate(1, mine)
    a.incref(b, theirs)
    assert a.holds(mine) == {b: 1} and a.holds(theirs) == {b: 1}
    with pytest.raises(AllocatorError, match="holds no reference"):
        a.decref(b, owner=0)
    assert a.decref(b, theirs) == 1 and a.decref(b, mine) == 0
    assert not a.holds(mine) and not a.holds(theirs)
    a.check()


def test_idle_cached_blocks_are_evicted_oldest_first_and_only_when_needed():
    a = BlockPool(3)
    x, y, z = a.allocate(3)
    assert a.cache(0, "x", x) and a.cache(0, "y", y)
    assert not a.cache(0, "x", z) and not a.cache(0, "other", x)  # one key, one block
    a.decref(x)
    a.decref(y)
    assert a.num_free == 2 and a.num_idle == 2 and a.is_idle(x) and a.num_cached == 2
    a.take_cached(y)  # a cache hit takes y back
    assert a.ref_count(y) == 1 and not a.is_idle(y)
    a.decref(y)  # y is idle again, now the newest
    a.free(z)
    assert a.allocate(1) == [z]  # plain free blocks go first
    assert a.lookup(0, "x") == x
    assert a.allocate(1) == [x]  # then the oldest idle one, and its entry goes
    assert a.lookup(0, "x") is None and a.lookup(0, "y") == y and a.lookup(1, "y") is None
    a.check()


def test_uncache_and_forget_namespace():
    a = BlockPool(3)
    ns = a.new_owner()
    blocks = a.allocate(3, ns)
    for i, b in enumerate(blocks):
        a.cache(ns, i, b)
    a.decref(blocks[0], ns)
    a.uncache(blocks[1])  # held: stays held, just uncached
    assert a.num_idle == 1 and a.num_cached == 2 and a.ref_count(blocks[1]) == 1
    a.forget_namespace(ns)
    assert a.num_cached == 0 and a.num_idle == 0 and a.num_free == 1
    a.check()


def test_check_catches_a_count_no_owner_holds():
    a = BlockPool(2)
    (b,) = a.allocate(1)
    a._refs[b] += 1  # corrupt on purpose
    with pytest.raises(InvariantError, match="owners hold 1"):
        a.check()


def test_several_managers_share_one_pool_across_threads():
    """Four managers (four models) on one pool, hammered from four threads: no block is lost
    or handed out twice, and every count matches the tables at the end."""
    pool = BlockPool(48)
    managers = [BlockManager(4, pool) for _ in range(4)]
    errors = []

    def work(manager, seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                live = manager.seq_ids
                op = rng.random()
                if op < 0.3 or not live:
                    prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 13))]
                    seq = manager.add_sequence(prompt_token_ids=prompt)  # shares cached prefixes
                    try:
                        manager.append(seq, len(prompt) - manager.context_len(seq))
                    except OutOfBlocksError:
                        manager.free(seq)
                elif op < 0.7:
                    try:
                        manager.append(rng.choice(live), rng.randrange(1, 7))
                    except OutOfBlocksError:
                        pass
                elif op < 0.8:
                    manager.fork(rng.choice(live))
                else:
                    manager.free(rng.choice(live))
                if rng.random() < 0.05:
                    manager.check()
            for seq in manager.seq_ids:
                manager.free(seq)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m, i)) for i, m in enumerate(managers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for m in managers:
        m.check()
        m.reset()
    assert pool.num_free == pool.num_blocks and pool.num_idle == 0 and pool.num_cached == 0
    pool.check()


def test_check_while_managers_are_created_on_other_threads():
    """No registry of managers: creating them races nothing that check() reads."""
    pool = BlockPool(64)
    first = BlockManager(4, pool)
    errors = []

    def create():
        try:
            for _ in range(200):
                m = BlockManager(4, pool)
                m.append(m.add_sequence(), 3)
                m.reset()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        first.check()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_dropped_manager_gives_its_blocks_back():
    """A manager dropped without close() (a model unloaded) is reclaimed by the pool, with a
    ResourceWarning, and the other managers' books stay right."""
    pool = BlockPool(8)
    keep = BlockManager(2, pool)
    keep.append(keep.add_sequence(), 3)
    gone = BlockManager(2, pool)
    gone.append(gone.add_sequence(prompt_token_ids=[1, 2, 3]), 3, token_ids=[1, 2, 3])
    assert pool.num_free == 4
    del gone
    with pytest.warns(ResourceWarning, match="dropped without close"):
        assert pool.num_free == 6
    keep.check()
    assert pool.num_cached == 0


def test_managers_closed_or_dropped_under_threads_leave_the_books_right():
    pool = BlockPool(64)
    survivor = BlockManager(4, pool)
    survivor.append(survivor.add_sequence(), 5)
    errors = []

    def churn(seed):
        rng = random.Random(seed)
        try:
            for i in range(100):
                m = BlockManager(4, pool)
                for _ in range(rng.randrange(1, 4)):
                    try:
                        m.append(m.add_sequence(prompt_token_ids=[rng.randrange(3) for _ in range(6)]), 6)
                    except OutOfBlocksError:
                        pass
                if i % 2:
                    m.close()
                del m  # the other half are reclaimed by the pool
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    with pytest.warns(ResourceWarning):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pool.check()
    assert not errors, errors
    survivor.check()
    assert pool.num_used == 2 and pool.num_cached == 0


def test_kv_events_name_each_block_its_parent_and_its_tokens():
    m = BlockManager(2, num_blocks=4)
    log = EventLog()
    m.block_pool.subscribe(log)
    s = m.add_sequence(prompt_token_ids=[1, 2, 3, 4, 5])
    m.append(s, 5)
    first, second = log.take()
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert first.parent_block_hash is None and second.parent_block_hash == first.block_hash
    assert (first.token_ids, second.token_ids, first.block_size) == ((1, 2), (3, 4), 2)
    assert [first.block_id, second.block_id] == m.block_table(s)[:2]
    assert first.namespace == second.namespace == m.prefix_cache.namespace
    m.free(s)
    assert log.take() == []  # idle cached blocks are still cached
    m.block_pool.allocate(4)  # every block: the two idle ones are evicted, oldest first
    removed = log.take()
    assert [type(e) for e in removed] == [BlockRemoved, BlockRemoved]
    assert {e.block_hash for e in removed} == {first.block_hash, second.block_hash}
    m.reset()
    assert log.take() == [AllBlocksCleared(m.prefix_cache.namespace)]
    m.block_pool.unsubscribe(log)
    m.reset()
    assert log.take() == []


def test_a_retained_system_prompt_outlives_one_off_prompts():
    """The eviction rule of pagedkv.blocks.retention: lowest priority first, then least recently used;
    a priority with a time to live lasts that long."""
    now = [0.0]
    m = BlockManager(2, BlockPool(6, clock=lambda: now[0]))
    system = [1, 2, 3, 4]
    s = m.add_sequence(prompt_token_ids=system + [9], retention=5)
    m.append(s, 5)
    t = m.add_sequence(prompt_token_ids=[7, 7, 7, 7, 9], retention=5, ttl=10)
    m.append(t, 5)
    m.free(s)
    m.free(t)  # 4 idle cached blocks (2 for good, 2 for 10 s), 2 free
    for i in range(3):  # one-off prompts at priority 0 take the free blocks, then evict each other
        o = m.add_sequence(prompt_token_ids=[50 + i, 50 + i, 9])
        m.append(o, 3)
        m.free(o)
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=system + [8])) == 4
    assert m.stats()["prefix_hits"] == 2  # both system-prompt blocks were still there
    # idle now: the ttl'd prompt's two blocks, then the last one-off's block (priority 0); one block free
    now[0] = 11  # the ttl has run out: the ttl'd blocks are priority 0, and idle for longer, so they go first
    m.block_pool.allocate(3)
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=[7, 7, 7, 7, 9])) == 0
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=[52, 52, 9])) == 2  # the one-off's block is left
    m.check()


@pytest.mark.parametrize("bad", [{"retention": -1}, {"retention": 1.5}, {"retention": True}, {"ttl": 0},
                                 {"ttl": -2.0}, {"ttl": float("inf")}, {"ttl": "1"}])
def test_bad_retention_is_refused(bad):
    from pagedkv import ArgumentError

    m = BlockManager(2, num_blocks=4)
    with pytest.raises(ArgumentError):
        m.add_sequence(prompt_token_ids=[1, 2, 3], **bad)
    assert m.seq_ids == [] and m.block_pool.num_free == 4
