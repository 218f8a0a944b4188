"""A hypothesis state machine drives a PagedKVCache with layer groups against a dense shadow.

The cache has a full-attention group and a sliding-window group over one pool (a hybrid
model such as Gemma 2). Every step writes each layer's K/V, a function of the sequence's
whole prefix and of the layer, through ``cache.write``; after every rule, each group's
manager checks its invariants, and every live sequence reads back, in every layer, its
own tokens at every position its group still holds, which must include every position
its next token's window reads. Steps and truncations move every group or none.
"""

import zlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pagedkv
from pagedkv import CacheConfig, OutOfBlocksError, PagedKVCache
from pagedkv.geometry.layout import window_start_block

ref = pagedkv.get_backend("numpy")
H, D = 1, 2
TOKEN = st.integers(0, 2)


def token_kv(prefix, layer) -> np.ndarray:
    h = zlib.crc32(repr((tuple(prefix), layer)).encode())
    return np.array([[[h % 4096, h // 4096 % 4096]], [[h // 2**24, -(h % 977)]]], dtype=np.float32)


class GroupedCacheMachine(RuleBasedStateMachine):
    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(4, 16), window=st.integers(1, 8),
                caching=st.booleans())
    def setup(self, block_size, num_blocks, window, caching):
        window = min(window, num_blocks * block_size)
        self.config = CacheConfig(num_layers=4, num_kv_heads=H, head_dim=D, num_blocks=num_blocks,
                                  block_size=block_size, layer_groups=[((1, 3), None), ((0, 2), window)])
        self.cache = PagedKVCache(self.config, backend="numpy", enable_prefix_caching=caching)
        self.shadow = {}  # seq -> token ids held

    def snapshot(self):
        c = self.cache
        return ({s: [(m.block_table(s), m.context_len(s)) for m in c.managers] for s in self.shadow},
                c.stats(), c.pool.data.copy())

    def unchanged_since(self, before):
        after = self.snapshot()
        assert after[:2] == before[:2]
        np.testing.assert_array_equal(after[2], before[2])

    def run_step(self, seqs, new):
        self.cache.end_step()  # begin_step ends the open step first: its deferred frees are not the step's
        before = self.snapshot()
        try:
            step = self.cache.begin_step(seqs, [len(t) for t in new], token_ids=new)
        except OutOfBlocksError:
            self.unchanged_since(before)
            return False
        for seq, ids in zip(seqs, new, strict=True):
            self.shadow[seq] = self.shadow[seq] + ids
        rows = [(seq, p) for seq, ids in zip(seqs, new, strict=True)
                for p in range(len(self.shadow[seq]) - len(ids), len(self.shadow[seq]))]
        for layer in range(self.config.num_layers):
            if rows:
                kv = np.stack([token_kv(self.shadow[s][:p + 1], layer) for s, p in rows])
                self.cache.write(layer, np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1]), step)
        return True

    @rule(prompt=st.lists(TOKEN, min_size=1, max_size=12))
    def add(self, prompt):
        seq, cached = self.cache.add_sequence(prompt_token_ids=prompt)
        assert cached <= len(prompt) - 1 and all(m.context_len(seq) == cached for m in self.cache.managers)
        self.shadow[seq] = prompt[:cached]
        if not self.run_step([seq], [prompt[cached:]]):  # no room for its prompt: give it up
            self.cache.free(seq)
            del self.shadow[seq]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def step(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.shadow)), min_size=1, unique=True))
        self.run_step(seqs, [data.draw(st.lists(TOKEN, max_size=3)) for _ in seqs])

    @rule()
    def end_step(self):
        self.cache.end_step()

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.shadow)))
        self.shadow[self.cache.fork(parent)] = list(self.shadow[parent])

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        new_len = data.draw(st.integers(0, len(self.shadow[seq])))
        before = self.snapshot()
        try:
            self.cache.truncate(seq, new_len)
        except pagedkv.ArgumentError:  # the sliding group freed what its next token would read
            self.unchanged_since(before)
            return
        del self.shadow[seq][new_len:]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        self.cache.free(seq)
        del self.shadow[seq]

    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        c, bs = self.cache, self.config.block_size
        for m in c.managers:
            m.check()
        for seq, ids in self.shadow.items():
            n = len(ids)
            for layer in range(self.config.num_layers):
                group, plane = self.config.plane_of(layer)
                m = c.managers[group]
                assert m.context_len(seq) == n
                table = m.block_table(seq)
                held = [p for p in range(n) if table[p // bs] >= 0]
                assert held == list(range(n - len(held), n))
                assert n - len(held) <= window_start_block(n, m.sliding_window, bs) * bs
                k, v = ref.read(c.pool, plane, np.array([table[p // bs] * bs + p % bs for p in held], np.int64))
                if held:
                    want = np.stack([token_kv(ids[:p + 1], layer) for p in held])
                    np.testing.assert_array_equal(k, want[:, 0])
                    np.testing.assert_array_equal(v, want[:, 1])


GroupedCacheMachine.TestCase.settings = settings(
    settings(), max_examples=settings().max_examples, stateful_step_count=15,
)
TestGroupedCacheMachine = GroupedCacheMachine.TestCase


def test_machine_catches_a_cache_that_frees_too_early(monkeypatch):
    """The machine is not vacuous: a sliding group that frees one block too many is caught."""
    from pagedkv.blocks.manager import SlidingWindowManager

    real = SlidingWindowManager._appended

    def greedy(self, seqs, firsts):
        real(self, seqs, [f + self.block_size for f in firsts])

    monkeypatch.setattr(SlidingWindowManager, "_appended", greedy)
    with pytest.raises(Exception):  # noqa: B017  (an InvariantError or a read-back mismatch)
        GroupedCacheMachine.TestCase("runTest").runTest()
