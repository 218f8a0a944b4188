"""BlockManager: the seeds' scenarios, copy-on-write, truncation, prefix caching, errors."""

import numpy as np
import pytest

import pagedkv as pk
from pagedkv import BlockManager, BlockPool, OutOfBlocksError, UnknownSequenceError


def state(m):
    """Everything observable about a manager, to prove a failed call changed nothing."""
    return (
        {s: (m.block_table(s), m.context_len(s)) for s in m.seq_ids},
        m.stats(), m.block_pool.num_free, m.block_pool.num_idle,
    )


def test_cortex_block_manager_scenario():
    """seed 000: counts tokens, not blocks * block_size."""
    m = BlockManager(16, num_blocks=10)
    seq = m.add_sequence()
    assert seq == 0
    assert m.append(seq, 5).slots.tolist() == [0, 1, 2, 3, 4]
    assert len(m.append(seq, 20).slots) == 20
    assert m.block_pool.num_used == 2  # ceil(25 / 16)
    assert m.context_len(seq) == 25
    assert m.block_tables([seq], max_blocks=4).tolist() == [[0, 1, -1, -1]]
    m.free(seq)
    assert m.block_pool.num_free == 10


def test_failed_append_takes_nothing():
    """seed 000's bug: a failed allocation must not leave blocks attached to the sequence."""
    m = BlockManager(4, num_blocks=3)
    a = m.add_sequence()
    m.append(a, 6)  # 2 blocks
    before = state(m)
    with pytest.raises(OutOfBlocksError):
        m.append(a, 7)  # would need 2 more
    assert state(m) == before
    m.check()


def test_failed_batch_changes_no_sequence():
    m = BlockManager(2, num_blocks=4)
    a, b = m.add_sequence(), m.add_sequence()
    m.append(a, 3)
    before = state(m)
    # a (3 tokens, 2 blocks) needs no new block for 1 more; b needs 3 for 5: 2 are free
    assert not m.can_append([a, b], [1, 5])
    with pytest.raises(OutOfBlocksError):
        m.append_batch([a, b], [1, 5])
    assert state(m) == before
    assert m.can_append([a, b], [1, 4])


def test_append_batch_slot_mapping_is_sequence_after_sequence():
    m = BlockManager(4, num_blocks=8)
    a, b = m.add_sequence(), m.add_sequence()
    r = m.append_batch([a, b], [6, 3])
    ta, tb = m.block_table(a), m.block_table(b)
    expected = [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[p // 4] * 4 + p % 4 for p in range(3)]
    assert r.slots.dtype == np.int64 and r.slots.tolist() == expected
    r = m.append_batch([a, b], [1, 1])  # a decode step
    assert r.slots.tolist() == [ta[1] * 4 + 2, tb[0] * 4 + 3]
    assert m.context_lens([a, b]).tolist() == [7, 4]
    assert m.context_lens([a]).dtype == np.int32


def test_fork_shares_blocks_and_copies_on_first_append():
    m = BlockManager(4, num_blocks=8)
    parent = m.add_sequence()
    m.append(parent, 6)  # one full block, one half-filled
    child = m.fork(parent)
    assert m.block_table(child) == m.block_table(parent)
    full, half = m.block_table(parent)
    assert m.block_pool.ref_count(full) == m.block_pool.ref_count(half) == 2
    r = m.append(child, 1)
    new = m.block_table(child)[1]
    assert r.copy_src.tolist() == [half] and r.copy_dst.tolist() == [new]
    assert r.slots.tolist() == [new * 4 + 2]
    assert m.block_pool.ref_count(half) == 2  # the parent, and the copy's source held until it ran
    assert m.release_copy_sources() == 0 and m.block_pool.ref_count(half) == 1
    assert m.block_pool.ref_count(full) == 2
    r = m.append(parent, 1)  # the parent is now the block's only holder: no copy
    assert r.copy_src.size == 0 and r.slots.tolist() == [half * 4 + 2]
    m.check()


def test_two_forks_appending_in_one_batch_copy_once():
    m = BlockManager(4, num_blocks=8)
    p = m.add_sequence()
    m.append(p, 2)
    c = m.fork(p)
    r = m.append_batch([p, c], [1, 1])
    assert len(r.copy_src) == 1  # the first copies; the second then holds the block alone
    assert len(set(r.slots.tolist())) == 2
    m.check()


def test_truncate_rolls_back_and_frees():
    m = BlockManager(4, num_blocks=8)
    s = m.add_sequence()
    m.append(s, 10)  # 3 blocks
    assert m.truncate(s, 5) == 1
    assert m.context_len(s) == 5 and len(m.block_table(s)) == 2
    assert m.append(s, 1).slots.tolist() == [m.block_table(s)[1] * 4 + 1]
    assert m.truncate(s, 0) == 2 and m.block_table(s) == []
    with pytest.raises(pk.PagedKVError, match="cannot truncate"):
        m.truncate(s, 1)
    m.check()


def test_truncate_into_a_shared_block_then_append_copies():
    m = BlockManager(4, num_blocks=8)
    p = m.add_sequence()
    m.append(p, 8)
    c = m.fork(p)
    m.truncate(c, 6)  # c's last block (shared with p) is now partly filled
    r = m.append(c, 1)
    assert r.copy_src.tolist() == [m.block_table(p)[1]]  # p's tokens 6, 7 stay intact
    m.check()


def test_prefix_cache_reuses_full_blocks_and_says_how_many():
    m = BlockManager(4, num_blocks=16)
    prompt = list(range(10))
    a = m.add_sequence(prompt_token_ids=prompt)
    assert m.num_cached_tokens(a) == 0
    m.append(a, len(prompt))  # blocks [0:4] and [4:8] become full and cached
    b = m.add_sequence(prompt_token_ids=prompt[:9] + [99])
    assert m.num_cached_tokens(b) == m.context_len(b) == 8
    assert m.block_table(b) == m.block_table(a)[:2]
    assert m.stats()["prefix_hits"] == 2
    r = m.append(b, 2)
    assert r.copy_src.size == 0  # b's third block is its own
    m.check()


def test_whole_prompt_cached_still_computes_the_last_token():
    m = BlockManager(4, num_blocks=16)
    a = m.add_sequence(prompt_token_ids=list(range(8)))
    m.append(a, 8)
    b = m.add_sequence(prompt_token_ids=list(range(8)))
    assert m.num_cached_tokens(b) == 4  # not 8: the last block holds the token to compute
    r = m.append(b, 4)
    assert r.copy_src.size == 0 and len(r.slots) == 4


def test_freed_cached_blocks_wait_and_are_evicted_only_when_needed():
    m = BlockManager(4, num_blocks=4)
    a = m.add_sequence(prompt_token_ids=list(range(9)))
    m.append(a, 9)  # 3 blocks, 2 of them full and cached
    assert m.free(a) == 3
    assert m.block_pool.num_free == 4 and m.block_pool.num_idle == 2
    b = m.add_sequence(prompt_token_ids=list(range(9)))
    assert m.num_cached_tokens(b) == 8  # revived
    m.free(b)
    c = m.add_sequence()
    m.append(c, 16)  # needs all 4 blocks: the cached ones are evicted
    assert m.block_pool.num_idle == 0 and m.stats()["blocks_cached"] == 0
    d = m.add_sequence(prompt_token_ids=list(range(9)))
    assert m.num_cached_tokens(d) == 0
    m.check()


def test_cache_salt_keeps_tenants_apart():
    m = BlockManager(4, num_blocks=16)
    a = m.add_sequence(prompt_token_ids=list(range(9)), cache_salt="tenant-a")
    m.append(a, 9)
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=list(range(9)), cache_salt="tenant-b")) == 0
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=list(range(9)), cache_salt="tenant-a")) == 8


def test_a_different_prefix_never_hits_even_with_equal_blocks():
    m = BlockManager(2, num_blocks=16)
    a = m.add_sequence(prompt_token_ids=[1, 2, 7, 7, 0])
    m.append(a, 5)
    b = m.add_sequence(prompt_token_ids=[3, 4, 7, 7, 0])  # second block equal, first differs
    assert m.num_cached_tokens(b) == 0


def test_evicting_a_parent_orphans_its_children():
    """A child entry names its parent by generation, never by block id: once the parent's
    block is evicted and reused for other tokens, the child can no longer be reached
    through it (naming the parent by block id would serve the child's K/V after the
    wrong prefix)."""
    m = BlockManager(2, num_blocks=3)
    s1 = m.add_sequence()
    m.append(s1, 2, token_ids=[1, 2])  # block 0 = [1, 2], cached
    s2 = m.add_sequence()
    m.append(s2, 2, token_ids=[1, 2])  # block 1, same tokens: not cached again
    m.append(s2, 2, token_ids=[3, 4])  # block 2 = [3, 4], cached as the child of [1, 2]
    m.free(s1)  # block 0 idle
    s4 = m.add_sequence()
    m.append(s4, 2, token_ids=[9, 9])  # evicts block 0 and caches [9, 9] in it
    assert m.block_table(s4) == [0]
    s5 = m.add_sequence(prompt_token_ids=[9, 9, 3, 4, 0])
    assert m.num_cached_tokens(s5) == 2  # [9, 9] only; [3, 4] followed [1, 2], not [9, 9]
    m.check()


def test_prefix_caching_can_be_switched_off():
    m = BlockManager(4, num_blocks=16, enable_prefix_caching=False)
    a = m.add_sequence(prompt_token_ids=list(range(9)))
    m.append(a, 9)
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=list(range(9)))) == 0
    assert m.stats()["blocks_cached"] == 0


def test_appended_token_ids_enter_the_cache():
    m = BlockManager(2, num_blocks=16)
    a = m.add_sequence()
    m.append(a, 4, token_ids=[5, 6, 7, 8])
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=[5, 6, 7, 8, 9])) == 4
    with pytest.raises(pk.PagedKVError, match="2 token ids for 3"):
        m.append(a, 3, token_ids=[1, 2])


def test_to_flashinfer():
    m = BlockManager(4, num_blocks=8)
    a, b, c = m.add_sequence(), m.add_sequence(), m.add_sequence()
    m.append(a, 6)
    m.append(b, 4)
    indptr, indices, last = m.to_flashinfer([a, b, c])
    assert indptr.tolist() == [0, 2, 3, 3]
    assert indices.tolist() == m.block_table(a) + m.block_table(b)
    assert last.tolist() == [2, 4, 0]
    assert indptr.dtype == indices.dtype == last.dtype == np.int32


def test_unknown_and_duplicate_sequences():
    m = BlockManager(4, num_blocks=4)
    with pytest.raises(UnknownSequenceError, match="no sequence 7"):
        m.append(7, 1)
    with pytest.raises(KeyError):
        m.free("nope")
    s = m.add_sequence("mine")
    with pytest.raises(pk.SequenceExistsError):
        m.add_sequence("mine")
    with pytest.raises(pk.PagedKVError, match="twice"):
        m.append_batch([s, s], [1, 1])
    with pytest.raises(pk.PagedKVError, match=">= 0"):
        m.append(s, -1)
    with pytest.raises(pk.PagedKVError, match="more than max_blocks"):
        m.append(s, 5)
        m.block_tables([s], max_blocks=1)


def test_constructor_errors():
    with pytest.raises(pk.ConfigError):
        BlockManager(4)
    with pytest.raises(pk.ConfigError):
        BlockManager(4, BlockPool(4), num_blocks=4)
    with pytest.raises(pk.ConfigError):
        BlockManager(0, num_blocks=4)


def test_reset_and_shared_allocator():
    shared = BlockPool(8)
    m1, m2 = BlockManager(4, shared), BlockManager(4, shared)
    s1 = m1.add_sequence(prompt_token_ids=list(range(9)))
    m1.append(s1, 9)
    s2 = m2.add_sequence()
    m2.append(s2, 8)
    assert shared.num_used == 5
    m1.reset()
    assert shared.num_used == 2 and shared.num_idle == 0
    assert m2.block_table(s2)  # the other manager's sequences are untouched
    m1.check()
    m2.check()


def test_check_catches_a_corrupted_count():
    m = BlockManager(4, num_blocks=4)
    s = m.add_sequence()
    m.append(s, 5)
    first, second = m.block_table(s)
    m.table.set_block(0, 0, second)  # corrupt the table on purpose: row 0 is s's
    m.block_pool.check()  # the pool itself is still consistent
    with pytest.raises(pk.InvariantError, match="differ from its block-table entries"):
        m.check()


def test_batch_with_a_zero_count_is_not_a_decode_step():
    """Found by the state machine: counts [0, 2] add up to the number of sequences."""
    m = BlockManager(1, num_blocks=4)
    a, b = m.add_sequence(), m.add_sequence()
    r = m.append_batch([a, b], [0, 2])
    assert r.slots.tolist() == [m.block_table(b)[0], m.block_table(b)[1]]


BAD_ARGUMENTS = {  # each a call on a manager holding s (6 tokens) and "other" (none); all must change nothing
    "a count that is a float": lambda m, s: m.append(s, 1.9),
    "a negative count": lambda m, s: m.append(s, -1),
    "a token id that is a float": lambda m, s: m.append(s, 1, token_ids=[np.float64(7)]),
    "too few token ids": lambda m, s: m.append(s, 3, token_ids=[1, 2]),
    "a rejected second sequence": lambda m, s: m.append_batch(
        [s, "other"], [4, 1], token_ids=[list(range(6, 10)), [np.float64(7)]]),
    "a sequence twice": lambda m, s: m.append_batch([s, s], [1, 1]),
    "more counts than sequences": lambda m, s: m.append_batch([s], [1, 1]),
    "truncate past the end": lambda m, s: m.truncate(s, 7),
    "truncate to a float": lambda m, s: m.truncate(s, 1.0),
    "an unusable salt": lambda m, s: m.add_sequence(prompt_token_ids=list(range(9)), cache_salt=[1]),
    "an unhashable id": lambda m, s: m.add_sequence(["x"]),
    "prompt ids that are not integers": lambda m, s: m.add_sequence(prompt_token_ids=["a"]),
    "too narrow block tables": lambda m, s: m.block_tables([s], max_blocks=1),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_argument_errors_and_change_nothing(case):
    m = BlockManager(4, num_blocks=8)
    s = m.add_sequence(prompt_token_ids=list(range(10)))
    m.append(s, 6)
    m.add_sequence("other")
    before = state(m)
    with pytest.raises(pk.ArgumentError) as info:
        BAD_ARGUMENTS[case](m, s)
    assert isinstance(info.value, ValueError)
    assert state(m) == before
    m.check()


def test_salts_are_compared_with_their_type():
    m = BlockManager(2, num_blocks=16)
    for salt in (1, True, 1.0, "1", b"1"):
        s = m.add_sequence(prompt_token_ids=[5, 6, 7], cache_salt=salt)
        assert m.num_cached_tokens(s) == 0  # no salt hits another's blocks
        m.append(s, 3)
    assert m.num_cached_tokens(m.add_sequence(prompt_token_ids=[5, 6, 7], cache_salt=True)) == 2


def test_a_copy_source_stays_held_until_the_copy_ran():
    """Writing into a cached block it alone holds, a sequence gets a copy; until the copy has
    run, no other manager on the pool can take the source and overwrite it."""
    pool = BlockPool(4)
    a, b = BlockManager(2, pool), BlockManager(2, pool)
    s = a.add_sequence()
    a.append(s, 2, token_ids=[1, 2])  # one full block, cached, held by s alone
    a.truncate(s, 1)
    (src,) = a.append(s, 1).copy_src.tolist()  # the cached block is copied, not written
    t = b.add_sequence()
    b.append(t, 2 * pool.num_free)  # every block b can take
    assert src not in b.block_table(t)
    a.check()
    b.check()
    a.release_copy_sources()
    assert pool.is_idle(src)  # released: cached and evictable again
    a.check()
