"""BlockAllocator: the free stack, reference counts, parking, errors, and sharing across threads."""

import random
import threading

import pytest

from pagedkv import AllocatorError, BlockAllocator, BlockIndexError, BlockManager, OutOfBlocksError


def test_llama_rs_page_allocator_scenario():
    a = BlockAllocator(4)
    b0, b1 = a.allocate(2)
    assert (a.num_free, a.num_used) == (2, 2)
    assert a.ref_count(b0) == a.ref_count(b1) == 1
    assert a.incref(b0) == 2
    assert a.decref(b0) == 1 and a.num_free == 2
    assert a.decref(b0) == 0 and a.num_free == 3
    a.free(b1)
    assert a.num_free == 4


def test_fragmentation_scenario():
    a = BlockAllocator(10)
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
    a = BlockAllocator(3)
    a.allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 blocks, 1 of 3 are free"):
        a.allocate(2)
    assert a.num_free == 1


def test_errors():
    a = BlockAllocator(3)
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
        BlockAllocator(0)
    with pytest.raises(AllocatorError, match="not parked"):
        a.revive(0)


def test_parked_blocks_are_evicted_oldest_first_and_only_when_needed():
    a = BlockAllocator(3)
    x, y, z = a.allocate(3)
    evicted = []
    a.decref(x, evicted.append)
    a.decref(y, evicted.append)
    assert a.num_free == 2 and a.num_parked == 2 and a.is_parked(x)
    a.revive(y)  # a cache hit takes y back
    assert a.ref_count(y) == 1 and not a.is_parked(y)
    a.decref(y, evicted.append)  # y is parked again, now the newest
    a.free(z)
    assert a.allocate(1) == [z]  # plain free blocks go first
    assert evicted == []
    assert a.allocate(1) == [x] and evicted == [x]  # then the oldest parked


def test_several_managers_share_one_allocator_across_threads():
    """Four managers (four models) on one pool, hammered from four threads: no block is lost
    or handed out twice, and every count matches the tables at the end."""
    allocator = BlockAllocator(48)
    managers = [BlockManager(4, allocator) for _ in range(4)]
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
    assert allocator.num_free == allocator.num_blocks and allocator.num_parked == 0
    allocator.check()
