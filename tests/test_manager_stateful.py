"""A hypothesis state machine drives a BlockManager against a dense shadow model.

Every rule writes real K/V through the numpy reference at the slots the
manager hands out (applying its copy-on-write copies first), and after every
rule each live sequence must read back exactly its own tokens. A token's K/V
is a function of its sequence's whole prefix and salt, as in a real model, so
a prefix-cache hit that served the wrong block reads back wrong. Under a
sliding window (one layer group of a hybrid model), the positions whose blocks
are still held read back, and every position the next token's window reads is held.
"""

import itertools
import zlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pagedkv
from pagedkv import BlockManager, CacheConfig, KVPool, OutOfBlocksError
from pagedkv.geometry.layout import window_start_block

ref = pagedkv.get_backend("numpy")
LAYERS, H, D = 2, 1, 2
TOKEN = st.integers(0, 2)  # a tiny vocabulary, so that prompts share prefixes often


def token_kv(salt, prefix, layer) -> np.ndarray:
    """K and V ([2, H, D]) of the last token of ``prefix``: a function of the whole prefix."""
    h = zlib.crc32(repr((salt, tuple(prefix), layer)).encode())
    return np.array([[[h % 4096, h // 4096 % 4096]], [[h // 2**24, -(h % 977)]]], dtype=np.float32)


class ManagerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(2, 10),
                layout=st.sampled_from(["NHD", "HND"]), caching=st.booleans(),
                window=st.one_of(st.none(), st.integers(1, 9)))
    def setup(self, block_size, num_blocks, layout, caching, window):
        self.pool = KVPool(CacheConfig(num_layers=LAYERS, num_kv_heads=H, head_dim=D,
                                       num_blocks=num_blocks, block_size=block_size, layout=layout))
        self.m = BlockManager(block_size, num_blocks=num_blocks, enable_prefix_caching=caching,
                              sliding_window=window)
        self.shadow = {}  # seq -> {"ids": held tokens, "pending": rest of the prompt, "salt"}
        self.unknown = itertools.count(1000)  # ids the manager is never told
        self.in_flight = set()  # blocks an open step's writes may still land in
        self.events = pagedkv.EventLog()  # the KV-event stream, replayed after every rule
        self.m.block_pool.subscribe(self.events)
        self.replayed = {}

    # -- helpers -----------------------------------------------------------------------------

    def snapshot(self):
        m = self.m
        return ({s: (m.block_table(s), m.context_len(s)) for s in m.seq_ids}, m.stats(),
                m.block_pool.num_idle, self.pool.data.copy())

    def unchanged_since(self, before):
        after = self.snapshot()
        assert after[:3] == before[:3]
        np.testing.assert_array_equal(after[3], before[3])

    def grow(self, seq, n, known):
        """Ids of seq's next n tokens (its pending prompt first, then new ones), and the ids
        to tell the manager: all of them if ``known``, else None (it learns none past the prompt)."""
        ids = self.shadow[seq]["pending"][:n]
        extra = n - len(ids)
        if known:
            ids = ids + [7 + i % 3 for i in range(extra)]  # known ids (7..9) beyond the prompt
            return ids, ids
        return ids + [next(self.unknown) for _ in range(extra)], None

    def append_batch(self, seqs, counts, ids_lists, told):
        before = self.snapshot()
        try:
            r = self.m.append_batch(seqs, counts, told)
        except OutOfBlocksError:
            self.unchanged_since(before)
            return False
        if r.copy_src.size:
            ref.copy_blocks(self.pool, r.copy_src, r.copy_dst)
            self.m.release_copy_sources()
        starts = []
        for seq, n, ids in zip(seqs, counts, ids_lists, strict=True):
            sh = self.shadow[seq]
            starts.append(len(sh["ids"]))
            sh["ids"].extend(ids)
            del sh["pending"][:n]
        for layer in range(LAYERS):
            rows = [token_kv(self.shadow[s]["salt"], self.shadow[s]["ids"][:p + 1], layer)
                    for s, n, start in zip(seqs, counts, starts, strict=True) for p in range(start, start + n)]
            if rows:
                kv = np.stack(rows)
                ref.write(self.pool, layer, np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1]),
                          r.slots)
        return True

    # -- rules -------------------------------------------------------------------------------

    @rule(prompt=st.lists(TOKEN, min_size=1, max_size=10), salt=st.sampled_from([None, "t"]),
          keep=st.integers(0, 2))
    def add(self, prompt, salt, keep):
        seq = self.m.add_sequence(prompt_token_ids=prompt, cache_salt=salt, retention=keep)
        cached = self.m.num_cached_tokens(seq)
        bs = self.m.block_size
        assert cached % bs == 0 and cached <= len(prompt) - 1
        self.shadow[seq] = {"ids": prompt[:cached], "pending": prompt[cached:], "salt": salt}
        self.append_batch([seq], [len(prompt) - cached], [prompt[cached:]], None)

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), n=st.integers(1, 5), known=st.booleans())
    def append(self, data, n, known):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        ids, told = self.grow(seq, n, known)
        self.append_batch([seq], [n], [ids], None if told is None else [told])

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), known=st.booleans())
    def step(self, data, known):
        """A batched step: several sequences, some with no new token."""
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.shadow)), min_size=1, unique=True))
        counts = [data.draw(st.integers(0, 3)) for _ in seqs]
        grown = [self.grow(s, n, known) for s, n in zip(seqs, counts, strict=True)]
        told = [t for _, t in grown] if known else None
        self.append_batch(seqs, counts, [ids for ids, _ in grown], told)

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.shadow)))
        child = self.m.fork(parent)
        sh = self.shadow[parent]
        self.shadow[child] = {"ids": list(sh["ids"]), "pending": list(sh["pending"]), "salt": sh["salt"]}

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        sh = self.shadow[seq]
        new_len = data.draw(st.integers(0, len(sh["ids"])))
        before = self.snapshot()
        try:
            self.m.truncate(seq, new_len)
        except pagedkv.ArgumentError:  # its next token would read blocks freed out of the window
            assert self.m.sliding_window is not None
            self.unchanged_since(before)
            return
        del sh["ids"][new_len:]
        sh["pending"] = []  # the manager forgets prompt ids past the cut too

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        self.m.free(seq)
        del self.shadow[seq]

    @rule()
    def open_step(self):
        """A step's writes are in flight from here: every block of every sequence may be written."""
        self.m.step_started()
        self.in_flight = {b for s in self.m.seq_ids for b in self.m.block_table(s) if b >= 0}

    @rule()
    def close_step(self):
        self.m.step_finished()
        self.in_flight = set()

    @rule()
    def reset(self):
        """Everything goes: sequences, held copies, the prefix cache (one AllBlocksCleared)."""
        self.m.reset()
        self.m.step_finished()
        self.shadow.clear()
        self.in_flight = set()

    @rule(prompt=st.lists(TOKEN, min_size=1, max_size=10),
          bad=st.sampled_from(["salt a list", "salt a dict", "a float id", "a string id"]))
    def add_rejected(self, prompt, bad):
        """Bad ids and bad salts are refused at the front door and change nothing."""
        before = self.snapshot()
        salt = {"salt a list": [1], "salt a dict": {}}.get(bad)
        if bad == "a float id":
            prompt = prompt + [np.float64(1)]
        elif bad == "a string id":
            prompt = ["7"] + prompt
        with pytest.raises(pagedkv.ArgumentError):
            self.m.add_sequence(prompt_token_ids=prompt, cache_salt=salt)
        self.unchanged_since(before)

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), bad=st.sampled_from(["a float count", "a negative count", "a float id", "too few ids"]))
    def step_rejected(self, data, bad):
        """A batch with one bad entry is refused whole: no sequence moves."""
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.shadow)), min_size=1, unique=True))
        counts = [1] * len(seqs)
        ids = [[7] for _ in seqs]
        if bad == "a float count":
            counts[-1] = 1.5
        elif bad == "a negative count":
            counts[-1] = -1
        elif bad == "a float id":
            ids[-1] = [np.float64(7)]
        else:
            ids[-1] = []
        before = self.snapshot()
        with pytest.raises(pagedkv.ArgumentError):
            self.m.append_batch(seqs, counts, ids)
        self.unchanged_since(before)

    # -- after every rule --------------------------------------------------------------------

    @invariant()
    def consistent(self):
        if not hasattr(self, "m"):
            return
        self.m.check()
        # an open step's blocks stay held, whatever was freed or truncated since: no one can get them
        assert all(self.m.block_pool.ref_count(b) > 0 for b in self.in_flight)
        # replaying the KV events rebuilds exactly the cached blocks
        pagedkv.blocks.events.replay(self.events.take(), self.replayed)
        namespace = self.m.prefix_cache.namespace
        cached = self.m.block_pool.cached_keys(namespace)
        assert self.replayed == {(namespace, key.digest): block for key, block in cached.items()}
        bs = self.m.block_size
        for seq, sh in self.shadow.items():
            n = len(sh["ids"])
            assert self.m.context_len(seq) == n
            table = self.m.block_table(seq)
            held = [p for p in range(n) if table[p // bs] >= 0]  # all, or all but those out of the window
            assert held == list(range(held[0] if held else n, n))
            assert not held or held[0] <= window_start_block(n, self.m.sliding_window, bs) * bs
            if self.m.sliding_window is None:
                assert len(held) == n
            slots = np.array([table[p // bs] * bs + p % bs for p in held], dtype=np.int64)
            for layer in range(LAYERS):
                k, v = ref.read(self.pool, layer, slots)
                if held:
                    want = np.stack([token_kv(sh["salt"], sh["ids"][:p + 1], layer) for p in held])
                    np.testing.assert_array_equal(k, want[:, 0])
                    np.testing.assert_array_equal(v, want[:, 1])


# The machine follows the hypothesis profile: 4x its examples (ci: 240, thorough: 4000), never below 200.
ManagerMachine.TestCase.settings = settings(
    settings(), max_examples=max(200, 4 * settings().max_examples), stateful_step_count=25,
)
TestManagerMachine = ManagerMachine.TestCase
