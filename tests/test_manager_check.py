"""The block-manager model checker: pagedkv's manager passes it, and a small manager with each
of the peers' bug classes planted is caught, by the random machine and by the named scenario."""

import pytest

import pagedkv
from pagedkv.testing.manager_check import SCENARIOS, BlockManagerMismatch, check_block_manager, run_scenario


class PagedkvAdapter:
    """pagedkv's BlockManager through the checker's protocol: the verify page's example adapter."""

    out_of_blocks = (pagedkv.OutOfBlocksError,)

    def __init__(self, num_blocks=6, block_size=2):
        self.m = pagedkv.BlockManager(block_size, num_blocks=num_blocks)
        self.num_blocks, self.block_size = num_blocks, block_size

    def add(self, seq, prompt):
        self.m.add_sequence(seq, prompt_token_ids=prompt)
        return self.m.context_len(seq)

    def append(self, seq, token_ids):
        r = self.m.append(seq, len(token_ids), token_ids)
        return r.slots.tolist(), list(zip(r.copy_src.tolist(), r.copy_dst.tolist(), strict=True))

    def fork(self, parent, child):
        self.m.fork(parent, child)

    def free(self, seq):
        self.m.free(seq)

    def truncate(self, seq, new_len):
        self.m.truncate(seq, new_len)

    def block_table(self, seq):
        return self.m.block_table(seq)

    def num_free(self):
        return self.m.block_pool.num_free


class Full(Exception):
    pass


class ToyManager:
    """A nano-vllm-sized manager (hash per full block, reference counts, no copy-on-write when
    ``bug`` says so), with one bug planted by name; ``bug=None`` is correct."""

    out_of_blocks = (Full,)

    def __init__(self, bug=None, num_blocks=6, block_size=2):
        self.bug, self.num_blocks, self.block_size = bug, num_blocks, block_size
        self.free_list = list(range(num_blocks))
        self.refs = [0] * num_blocks
        self.by_hash, self.hash_of = {}, {}  # hash -> block, block -> hash
        self.tables, self.tokens = {}, {}
        self.last_freed = {}  # seq -> its blocks when freed (the double_free bug frees them again)

    def _hash(self, prefix_tokens, block_tokens):
        if self.bug == "hash_collision":  # order-insensitive, and not chained: prompts collide
            return hash(frozenset(block_tokens))
        return hash(tuple(prefix_tokens) + tuple(block_tokens))

    def _take(self):
        if not self.free_list:
            raise Full
        b = self.free_list.pop(0)
        h = self.hash_of.pop(b, None)
        if self.bug != "stale_hash_after_reallocation" and h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]  # a reused block leaves the cache
        self.refs[b] = 1
        return b

    def add(self, seq, prompt):
        self.tables[seq], self.tokens[seq] = [], []
        bs, n = self.block_size, 0
        limit = len(prompt) if self.bug == "full_prefix_hit" else len(prompt) - 1
        while n + bs <= limit:
            b = self.by_hash.get(self._hash(prompt[:n], prompt[n:n + bs]))
            if b is None:
                break
            if self.refs[b] == 0:
                self.free_list.remove(b)
            self.refs[b] += 1
            self.tables[seq].append(b)
            n += bs
        self.tokens[seq] = list(prompt[:n])
        return n

    def append(self, seq, token_ids):
        bs, table, toks = self.block_size, self.tables[seq], self.tokens[seq]
        need = -(-(len(toks) + len(token_ids)) // bs) - len(table)
        copies = []
        if toks and len(toks) % bs and self.refs[table[-1]] > 1 and self.bug != "write_without_copy_on_write":
            need += 1
        if need > len(self.free_list):
            if self.bug == "leak_on_failed_allocation":
                for _ in range(len(self.free_list)):
                    self._take()  # taken, then lost
            raise Full
        if toks and len(toks) % bs and self.refs[table[-1]] > 1 and self.bug != "write_without_copy_on_write":
            new = self._take()
            copies.append((table[-1], new))
            self.refs[table[-1]] -= 1
            table[-1] = new
        slots = []
        for t in token_ids:
            if len(toks) % bs == 0:
                table.append(self._take())
            slots.append(table[-1] * bs + len(toks) % bs)
            toks.append(t)
            if len(toks) % bs == 0:  # a full block enters the cache
                h = self._hash(toks[:-bs], toks[-bs:])
                self.by_hash.setdefault(h, table[-1])
                self.hash_of.setdefault(table[-1], h)
        return slots, copies

    def fork(self, parent, child):
        self.tables[child], self.tokens[child] = list(self.tables[parent]), list(self.tokens[parent])
        for b in self.tables[child]:
            self.refs[b] += 1

    def free(self, seq):
        if seq not in self.tables and self.bug != "double_free":
            raise KeyError(seq)
        for b in self.tables.get(seq, self.last_freed.get(seq, [])):
            self.refs[b] -= 1
            if self.refs[b] <= 0:
                self.refs[b] = 0
                self.free_list.append(b)
        self.last_freed[seq] = self.tables.pop(seq, [])
        self.tokens.pop(seq, None)

    def truncate(self, seq, new_len):
        raise NotImplementedError

    def block_table(self, seq):
        return list(self.tables[seq])

    def num_free(self):
        return len(self.free_list)


def test_pagedkv_passes_the_machine_and_every_scenario():
    check_block_manager(PagedkvAdapter, max_examples=60)
    for name in SCENARIOS:
        run_scenario(name, lambda: PagedkvAdapter(num_blocks=8))


def test_a_correct_toy_manager_passes():
    check_block_manager(ToyManager, max_examples=60)
    for name in SCENARIOS:
        run_scenario(name, lambda: ToyManager(num_blocks=8))


@pytest.mark.parametrize("bug", sorted(SCENARIOS))
def test_each_planted_bug_is_caught_by_its_scenario_and_by_the_machine(bug):
    with pytest.raises(BlockManagerMismatch):
        run_scenario(bug, lambda: ToyManager(bug, num_blocks=8))
    with pytest.raises(BlockManagerMismatch):
        # (a fork, then appends to both inside their shared block: the machine needs more examples to find it)
        check_block_manager(lambda: ToyManager(bug), max_examples=400 if bug == "write_without_copy_on_write" else 100,
                            steps=25, shrink=False)


def test_a_double_free_is_caught():
    with pytest.raises(BlockManagerMismatch, match="freed twice"):
        check_block_manager(lambda: ToyManager("double_free"), max_examples=100, steps=25, shrink=False)
