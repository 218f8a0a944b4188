"""Sequences to blocks: :class:`BlockManager`, with copy-on-write forks and a prefix cache.

The manager never touches K/V data: it says where new tokens go (slots), where
a sequence's tokens are (block tables) and which blocks to copy before writing
(copy-on-write). It keeps the sequences and plans their appends; the parts
below it check their own invariants: ``block_pool`` (free blocks, reference
counts, the cache index), ``block_table``, ``prefix_cache`` and ``prefix_key``.

Rules it keeps:

- A sequence of ``n`` tokens holds exactly ``ceil(n / block_size)`` blocks
  (table entries: under a sliding window, those wholly before the window of
  the latest step's first query are freed and read -1).
- A block is written only if its one holder is the writer and it is not in
  the prefix cache; otherwise the writer gets a fresh copy first, reported
  as a ``(src, dst)`` pair to apply with ``copy_blocks`` before writing.
  The source stays held until the copy has surely run (see
  :meth:`BlockManager.release_copy_sources`), so no one can take it first.
- Frees wait for the step in flight (:meth:`BlockManager.step_started` until
  :meth:`BlockManager.step_finished`): no write of it lands in a block given away.
- An append is planned (every argument checked, every block counted) before
  anything moves, then applied: a call that fails changes nothing.
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from ..errors import (
    ArgumentError,
    ConfigError,
    ContextLengthError,
    InvariantError,
    SequenceExistsError,
    UnknownSequenceError,
)
from ..geometry.layout import INT32_MAX, cdiv, window_start_block
from . import prefix_key, sequence
from .block_pool import BlockPool
from .block_table import BlockTable
from .prefix_cache import PrefixCache
from .sequence import Appended, SequenceState, count


class BlockManager:
    """Block tables, token counts, copy-on-write and prefix caching for one model.

    Args:
        block_size: tokens per block (the pool's ``block_size``).
        block_pool: a :class:`BlockPool` to share with other managers; or pass
            ``num_blocks`` for a private one.
        num_blocks: size of a private pool.
        enable_prefix_caching: reuse cached full blocks of earlier prompts.
        sliding_window: a window makes a :class:`SlidingWindowManager` (the layers of a
            sliding-window group); None, this one, whose layers attend to every position.
        group: the layer group this manager serves, named by its KV events.
    """

    #: the positions a query attends to, itself included (None: all; see :class:`SlidingWindowManager`)
    sliding_window: int | None = None

    def __new__(cls, *args: object, sliding_window: int | None = None, **kwargs: object) -> BlockManager:
        # BlockManager(..., sliding_window=W) makes the window's manager, as it always has
        return super().__new__(SlidingWindowManager if cls is BlockManager and sliding_window is not None else cls)

    def __init__(self, block_size: int, block_pool: BlockPool | None = None, *,
                 num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, group: int = 0) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        if sliding_window is not None:
            raise ConfigError("a sliding window needs a SlidingWindowManager (BlockManager(..., sliding_window=W) "
                              "makes one)")
        if (block_pool is None) == (num_blocks is None):
            raise ConfigError("pass exactly one of block_pool and num_blocks")
        self.block_size = block_size
        self.block_pool = block_pool if block_pool is not None else BlockPool(num_blocks)  # type: ignore[arg-type]
        self._owner = self.block_pool.new_owner(group)  # its holds, and its namespace of cache keys
        # Dropped without close() (a model unloaded, say): the pool takes its blocks back.
        weakref.finalize(self, self.block_pool.abandon, self._owner)
        self.prefix_cache = PrefixCache(self.block_pool, self._owner, block_size, enable_prefix_caching)
        self.table = BlockTable()
        self._copy_sources: list[int] = []  # copy-on-write sources held until their copies ran
        self._in_flight = False  # a step is running: released blocks wait in _deferred until it ends
        self._deferred: list[int] = []
        self._seqs: dict[Hashable, SequenceState] = {}
        self._next_id = itertools.count()

    def __repr__(self) -> str:
        return f"BlockManager(block_size={self.block_size}, sequences={len(self._seqs)}, {self.block_pool!r})"

    # -- sequences ---------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable = None, *, prompt_token_ids: Sequence[int] | None = None,
                     cache_salt: object = None, retention: int = 0, ttl: float | None = None,
                     max_cached_blocks: int | None = None) -> Hashable:
        """Start a sequence and return its id (a new int unless ``seq_id`` is given).

        With ``prompt_token_ids``, the longest run of the prompt's full blocks
        already in the prefix cache is attached at once: the sequence starts
        with that many tokens (see :meth:`num_cached_tokens`), and the rest of
        the prompt is appended as usual. The last prompt token is never taken
        from the cache, so that the model computes it (its logits are needed).
        ``cache_salt`` (str, bytes, int, float or bool) keeps the cached
        prefixes of different tenants apart. Its cached blocks are evicted after those of a
        lower ``retention`` priority (kept ``ttl`` seconds, or for good): :mod:`pagedkv.blocks.retention`.
        ``max_cached_blocks`` caps the blocks taken from the cache (managers of several layer
        groups agree on one hit: :meth:`cached_prefix_blocks`). Cost: O(prompt length).
        """
        ids = None if prompt_token_ids is None else prefix_key.token_ids(prompt_token_ids, "prompt_token_ids")
        kept = sequence.retention(retention, ttl)
        extras = prefix_key.salt_extras(cache_salt)
        try:
            hash(seq_id)
        except TypeError:
            raise ArgumentError(f"a sequence id must be hashable, got {type(seq_id).__name__}") from None
        with self.block_pool.lock:
            if seq_id is None:
                seq_id = next(self._next_id)
                while seq_id in self._seqs:
                    seq_id = next(self._next_id)
            elif seq_id in self._seqs:
                raise SequenceExistsError(f"sequence {seq_id!r} exists already")
            seq = SequenceState(self.table.add_row(), extras=extras, token_ids=ids or [], retention=kept)
            keys = self.prefix_cache.prompt_keys(seq.token_ids, extras)
            hit = self.prefix_cache.longest_hit(keys, self.sliding_window, max_cached_blocks)
            blocks = self.prefix_cache.take_prefix(keys, hit, self.sliding_window, kept)
            seq.keys, seq.nulls = keys[:hit], self.prefix_cache.needed(hit, self.sliding_window)
            self.table.append_row(seq.row, blocks)
            seq.num_tokens = seq.num_cached_tokens = len(blocks) * self.block_size
            self._seqs[seq_id] = seq
            return seq_id

    def cached_prefix_blocks(self, prompt_token_ids: Sequence[int], cache_salt: object = None,
                             limit: int | None = None) -> int:
        """How many of the prompt's full blocks (at most ``limit``) :meth:`add_sequence` would
        take from the prefix cache now; looks only. Managers of several layer groups over one
        pool agree on a hit by taking the least of their answers, passed back as ``limit``,
        until it holds (under ``block_pool.lock``). Cost: O(prompt length)."""
        keys = self.prompt_keys(prompt_token_ids, cache_salt)
        with self.block_pool.lock:
            return self.prefix_cache.longest_hit(keys, self.sliding_window, limit)

    def prompt_keys(self, prompt_token_ids: Sequence[int], cache_salt: object = None) -> list[prefix_key.BlockKey]:
        """The prefix-cache keys of the prompt's full blocks (its ids and salt checked; none with
        caching off). They hash tokens, not blocks: the same in every manager, so managers of
        several layer groups compute them once (:meth:`PrefixCache.longest_hit`). O(prompt length)."""
        ids = prefix_key.token_ids(prompt_token_ids, "prompt_token_ids")
        return self.prefix_cache.prompt_keys(ids, prefix_key.salt_extras(cache_salt))

    def fork(self, seq_id: Hashable, child_id: Hashable = None) -> Hashable:
        """A new sequence sharing every block and token of ``seq_id``; returns its id.

        Nothing is copied now: the first append of either into their shared,
        partly filled last block reports the copy to make. Cost: O(its blocks and known ids).
        """
        with self.block_pool.lock:
            parent = self._get(seq_id)
            child_id = self.add_sequence(child_id)
            child = self._seqs[child_id]
            blocks = self.table.blocks(parent.row)
            for block in blocks[parent.nulls:]:
                self.block_pool.incref(block, self._owner)
            self.table.append_row(child.row, blocks)
            child.num_tokens, child.extras, child.retention = parent.num_tokens, parent.extras, parent.retention
            child.nulls = parent.nulls
            child.token_ids, child.keys = list(parent.token_ids), list(parent.keys)
            return child_id

    def free(self, seq_id: Hashable) -> int:
        """End a sequence; returns how many blocks went back to the pool.

        Blocks still shared with another sequence stay; cached blocks wait idle
        (still valid for the prefix cache) and count as returned. Cost: O(its blocks).
        """
        with self.block_pool.lock:
            seq = self._get(seq_id)
            returned = self._release(self.table.blocks(seq.row))
            self.table.clear_row(seq.row)
            del self._seqs[seq_id]
            return returned

    def truncate(self, seq_id: Hashable, new_len: int) -> int:
        """Roll a sequence back to its first ``new_len`` tokens (rejected speculative tokens).

        Blocks no longer needed are released; returns how many went back to
        the pool. A kept, now partly filled block that is shared or cached is
        copied on the next append, so no one else's tokens are overwritten.
        Cost: O(blocks and tokens dropped), whatever the sequence's length.
        """
        with self.block_pool.lock:
            seq, new_len = self._get(seq_id), self.check_truncate(seq_id, new_len)
            seq.nulls = min(seq.nulls, cdiv(new_len, self.block_size))
            returned = self._release(self.table.truncate_row(seq.row, cdiv(new_len, self.block_size)))
            seq.truncate(new_len, self.block_size)
            return returned

    def check_truncate(self, seq_id: Hashable, new_len: object) -> int:
        """``new_len`` as an int if :meth:`truncate` would take it, else the error it would raise
        (changing nothing): past the sequence's end, or under a sliding window, so short that
        its next token would read blocks already freed out of the window. O(1)."""
        seq, new_len = self._get(seq_id), count(new_len, "new_len")
        if new_len > seq.num_tokens:
            raise ArgumentError(f"cannot truncate sequence {seq_id!r} of {seq.num_tokens} tokens to {new_len}")
        return new_len

    def reset(self) -> None:
        """Free every sequence of this manager and forget its prefix cache; O(its blocks + cache entries)."""
        with self.block_pool.lock:
            self.release_copy_sources()
            for seq_id in list(self._seqs):
                self.free(seq_id)
            self.prefix_cache.reset()

    def close(self) -> None:
        """Give everything back: every sequence, the prefix cache, held copy sources (like
        :meth:`reset`). ``with BlockManager(...) as m:`` closes on the way out. A manager
        dropped without closing is reclaimed by the pool, with a ResourceWarning."""
        self.reset()
        self.step_finished()

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release_copy_sources(self) -> int:
        """Let go of the sources of the copies the last append reported, once they are applied.

        An append that copies a block keeps holding the source, so that no
        other sequence or manager can take and overwrite it before the copy
        runs. The next append releases them first (its caller has applied
        the previous copies by then, even if that append then fails); call
        this to release them sooner, right after ``copy_blocks``, as
        :class:`~pagedkv.PagedKVCache` does. Returns how many blocks went back.
        """
        with self.block_pool.lock:
            sources, self._copy_sources = self._copy_sources, []
            return self._release(sources)

    def _release(self, blocks: list[int]) -> int:
        """Drop this manager's hold on each block, last first; returns how many went back (none
        while a step is in flight: they wait for :meth:`step_finished`)."""
        blocks = [b for b in blocks if b >= 0]  # -1: freed out of a sliding window already
        if self._in_flight:
            self._deferred.extend(blocks)
            return 0
        return sum(self.block_pool.decref(b, self._owner) == 0 for b in reversed(blocks))

    def step_started(self) -> None:
        """A step's writes are in flight (an asynchronous writer, a GPU stream): until
        :meth:`step_finished`, blocks let go of stay held, so no append hands them to another
        sequence under a write still landing there (vLLM #45357); frees count 0 meanwhile."""
        with self.block_pool.lock:
            self._in_flight = True

    @property
    def step_in_flight(self) -> bool:
        """Whether a step is running (between :meth:`step_started` and :meth:`step_finished`)."""
        return self._in_flight

    def step_finished(self) -> int:
        """The step's writes have landed: give back the blocks held since :meth:`step_started`
        (returns how many went back to the pool). O(blocks held back)."""
        with self.block_pool.lock:
            self._in_flight = False
            deferred, self._deferred = self._deferred, []
            return self._release(deferred)

    # -- appending: check, plan, allocate, apply -----------------------------------------------

    def append(self, seq_id: Hashable, n: int, token_ids: Sequence[int] | None = None) -> Appended:
        """Make room for ``n`` more tokens of one sequence; see :meth:`append_batch`."""
        return self.append_batch([seq_id], [n], None if token_ids is None else [token_ids])

    def append_batch(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray,
                     token_ids: Sequence[Sequence[int] | None] | None = None) -> Appended:
        """Make room for ``counts[i]`` more tokens of each ``seq_ids[i]``: one decode or prefill step.

        Returns the slot mapping of all new tokens, sequence after sequence,
        and the block copies to apply first (copy-on-write). All or nothing:
        every argument is checked and converted, and every block counted,
        before anything changes; if the pool cannot hold every sequence's
        tokens, OutOfBlocksError is raised and no sequence changes.

        ``token_ids[i]`` (optional) are the ids of sequence i's new tokens,
        which lets the blocks they fill enter the prefix cache; a prompt's
        own ids are known already. A full block is entered into the cache
        when this call fills it, so its K/V must be written before any
        attention reads it (in the same step, as a decode loop does).
        Cost: O(B + new tokens), whatever the sequences' lengths.
        """
        with self.block_pool.lock:
            seqs, counts, ids = self._check_batch(seq_ids, counts, token_ids)
            self.release_copy_sources()  # the previous append's copies have been applied by now
            plan, fresh = self._plan(seqs, counts)
            new_blocks = self.block_pool.allocate(fresh, self._owner)  # the only step that can fail
            return self._apply(seqs, counts, ids, plan, new_blocks)

    def can_append(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray) -> bool:
        """Whether :meth:`append_batch` with these arguments would find enough blocks now; O(B)."""
        with self.block_pool.lock:
            return self.block_pool.can_allocate(self.blocks_needed(seq_ids, counts))

    def blocks_needed(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray) -> int:
        """Blocks :meth:`append_batch` with these arguments would take from the pool beyond those
        it gives back first (the held copy sources); checks the arguments like it. O(B)."""
        with self.block_pool.lock:
            seqs, counts, _ = self._check_batch(seq_ids, counts, None)
            pending = Counter(self._copy_sources)  # released by append_batch before it plans
            freed = sum(self.block_pool.ref_count(b) == n for b, n in pending.items())
            return self._plan(seqs, counts, pending)[1] - freed

    def _check_batch(self, seq_ids, counts, token_ids) -> tuple[list[SequenceState], list[int], list]:
        seqs = [self._get(s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ArgumentError("a sequence appears twice in one append_batch")
        counts = sequence.counts(counts, "a token count")
        if len(counts) != len(seqs):
            raise ArgumentError(f"{len(counts)} counts for {len(seqs)} sequences")
        ids: list = [None] * len(seqs)
        if token_ids is not None:
            if len(token_ids) != len(seqs):
                raise ArgumentError(f"{len(token_ids)} token-id lists for {len(seqs)} sequences")
            for i, (seq_id, seq, n, given) in enumerate(zip(seq_ids, seqs, counts, token_ids, strict=True)):
                if given is not None:
                    ids[i] = seq.checked_ids(given, n, repr(seq_id))
        return seqs, counts, ids

    def _plan(self, seqs: list[SequenceState], counts: list[int],
              pending: Counter[int] | None = None) -> tuple[list[tuple[bool, int]], int]:
        """Per sequence: (copy its last block first?, new blocks needed); and the total to allocate.
        ``pending``: copy sources to count as released."""
        bs, plan, total = self.block_size, [], 0
        shared: dict[int, int] = {}  # holders of a last block, as the earlier sequences of this batch leave it
        for seq, n in zip(seqs, counts, strict=True):
            cow = False
            if n and seq.num_tokens % bs:  # the last block is partly filled: we write into it
                last = self.table.last_block(seq.row)
                holders = shared.get(last)
                if holders is None:
                    holders = self.block_pool.ref_count(last) - (pending[last] if pending else 0)
                if holders > 1 or self.block_pool.is_cached(last):  # others read it, or later prompts do
                    cow = True
                    shared[last] = holders - 1
            grow = cdiv(seq.num_tokens + n, bs) - self.table.num_blocks(seq.row)
            plan.append((cow, grow))
            total += grow + cow
        return plan, total

    def _apply(self, seqs, counts, ids, plan, new_blocks) -> Appended:
        fresh = iter(new_blocks)
        src, dst, starts = [], [], []
        for seq, n, given, (cow, grow) in zip(seqs, counts, ids, plan, strict=True):
            if cow:
                last, copy = self.table.last_block(seq.row), next(fresh)
                src.append(last)
                dst.append(copy)
                self.table.set_block(seq.row, self.table.num_blocks(seq.row) - 1, copy)
                self._copy_sources.append(last)  # held until the copy has run
            if grow:
                self.table.append_row(seq.row, list(itertools.islice(fresh, grow)))
            starts.append(seq.num_tokens)
            seq.add_tokens(n, given)
        slots = self.table.slot_mapping([s.row for s in seqs], starts, counts, self.block_size)
        for seq in seqs:
            if self.prefix_cache.has_new_full_blocks(seq.keys, seq.token_ids, seq.num_tokens):
                self.prefix_cache.enter_full_blocks(seq.keys, seq.token_ids, self.table.blocks(seq.row, len(seq.keys)),
                                                    seq.num_tokens, seq.extras, seq.retention)
        self._appended(seqs, starts)  # after the cache took what filled: a window may keep them idle
        return Appended(slots, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64))

    def _appended(self, seqs: list[SequenceState], first_queries: list[int]) -> None:
        """After an append, whose query ``i`` at ``first_queries[i]`` is the first of its sequence:
        nothing here (every position stays readable); a sliding window lets go of blocks."""

    # -- views for kernels -------------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> SequenceState:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"no sequence {seq_id!r} in this manager") from None

    # ---- views of the sequences (what kernels and callers read) and the invariants ----

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of one sequence, in token order (a copy; -1 for blocks freed out of a
        sliding window); O(its blocks)."""
        return self.table.blocks(self._get(seq_id).row)

    def context_len(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds; O(1)."""
        return self._get(seq_id).num_tokens

    def num_cached_tokens(self, seq_id: Hashable) -> int:
        """Prompt tokens that came from the prefix cache when the sequence was added; O(1)."""
        return self._get(seq_id).num_cached_tokens

    def block_tables(self, seq_ids: Iterable[Hashable], max_blocks: int | None = None) -> np.ndarray:
        """int32 ``[B, max_blocks]`` block tables, padded with -1 (never read by a kernel);
        ``max_blocks`` defaults to the longest table among ``seq_ids``. Cost: O(B * max_blocks)."""
        rows = [self._get(s).row for s in seq_ids]
        longest = max((self.table.num_blocks(r) for r in rows), default=0)
        width = longest if max_blocks is None else max_blocks
        if longest > width:
            raise ArgumentError(f"a sequence holds {longest} blocks, more than max_blocks={width}")
        return self.table.rows(rows, width)

    def context_lens(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """int32 ``[B]`` token counts (a ContextLengthError for one past int32); O(B)."""
        lens = [self._get(s).num_tokens for s in seq_ids]
        if lens and max(lens) > INT32_MAX:
            raise ContextLengthError(f"a sequence of {max(lens)} tokens has a length past int32")
        return np.array(lens, dtype=np.int32)

    def to_flashinfer(self, seq_ids: Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FlashInfer's paged format, int32 ``(kv_indptr, kv_indices, kv_last_page_len)``: sequence
        b's pages are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, its last holding
        ``kv_last_page_len[b]`` tokens (0: empty). Cost: O(B * longest table)."""
        seqs = [self._get(s) for s in seq_ids]
        return self.table.to_flashinfer([s.row for s in seqs], [s.num_tokens for s in seqs], self.block_size)

    # -- numbers -----------------------------------------------------------------------------

    @property
    def seq_ids(self) -> list[Hashable]:
        """Ids of the live sequences, oldest first."""
        return list(self._seqs)

    def blocks_held(self) -> int:
        """Distinct blocks this manager holds (its sequences' and pending ones); O(its holds)."""
        with self.block_pool.lock:
            return len(self.block_pool.holds(self._owner))

    def stats(self) -> dict[str, float | int]:
        """Counts for logs and dashboards (the block counts are the whole pool's); O(sequences)."""
        with self.block_pool.lock:
            return {"sequences": len(self._seqs), "tokens": sum(s.num_tokens for s in self._seqs.values()),
                    **self.block_pool.stats(), **self.prefix_cache.stats()}

    # -- invariants --------------------------------------------------------------------------

    def check(self) -> None:
        """Verify every invariant; raise :class:`~pagedkv.InvariantError` at the first broken one.

        Checked: the pool's own (see :meth:`BlockPool.check`); each sequence
        holds exactly the blocks its tokens need, in its table row (under a sliding window,
        the leading ones its next token does not read may be freed: -1); it chains
        no more cached blocks than it has full; and the references this
        manager holds in the pool are exactly its table entries, the
        sources of copies not yet released and the frees a step in flight defers. Cost: O(pool blocks + table entries).
        """
        with self.block_pool.lock:
            self.block_pool.check()
            held: Counter[int] = Counter()
            for seq_id, seq in self._seqs.items():
                blocks = cdiv(seq.num_tokens, self.block_size)
                if not self.table.check_row(seq.row, blocks, seq.nulls):
                    raise InvariantError(f"sequence {seq_id!r} has {seq.num_tokens} tokens but its table row "
                                         f"is {self.table.blocks(seq.row)}")
                if seq.nulls > window_start_block(seq.num_tokens, self.sliding_window, self.block_size):
                    raise InvariantError(f"sequence {seq_id!r} freed blocks its next token's window reads")
                if len(seq.keys) > seq.num_tokens // self.block_size:
                    raise InvariantError(f"sequence {seq_id!r} chains more cached blocks than it has full")
                held.update(self.table.blocks(seq.row, seq.nulls))
            if self._deferred and not self._in_flight:
                raise InvariantError(f"{len(self._deferred)} freed blocks wait for a step to end, "
                                     "but none is in flight")
            held.update(self._copy_sources + self._deferred)
            if held != self.block_pool.holds(self._owner):
                raise InvariantError("this manager's references in the pool differ from its block-table entries, "
                                     "pending copy sources and frees deferred by a step in flight")


class SlidingWindowManager(BlockManager):
    """The manager of a sliding-window layer group (vLLM's ``SlidingWindowManager`` beside its
    full-attention one): a query at position ``p`` reads positions ``p - W + 1 .. p`` only, so

    - each append first lets go of the blocks whose positions have all left the window of the
      step's first query (their table entries become -1: the kernels never read them);
    - a prefix hit needs only the cached blocks inside the window of the first uncached token
      (the prefix cache asks for ``sliding_window``);
    - a truncation that would make the next token read a freed block is refused.

    Args:
        sliding_window: the window W, a positive int; the rest as for :class:`BlockManager`.
    """

    def __new__(cls, *args: object, **kwargs: object) -> SlidingWindowManager:
        return object.__new__(cls)

    def __init__(self, block_size: int, block_pool: BlockPool | None = None, *,
                 num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, group: int = 0) -> None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
            raise ConfigError(f"sliding_window must be None or a positive integer, got {sliding_window!r}")
        super().__init__(block_size, block_pool, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching,
                         group=group)
        self.sliding_window = sliding_window

    def check_truncate(self, seq_id: Hashable, new_len: object) -> int:
        new_len = super().check_truncate(seq_id, new_len)
        seq = self._get(seq_id)
        if window_start_block(new_len, self.sliding_window, self.block_size) < min(seq.nulls,
                                                                                   cdiv(new_len, self.block_size)):
            raise ArgumentError(f"cannot truncate sequence {seq_id!r} to {new_len} tokens: blocks its next "
                                f"token would read left the sliding window of {self.sliding_window} and were freed")
        return new_len

    def _appended(self, seqs: list[SequenceState], first_queries: list[int]) -> None:
        """Let go of each sequence's blocks wholly before the window of its query at
        ``first_queries[i]``: no query of this step or after reads them (a truncation that
        would is refused). Inline arithmetic: this runs for every sequence of every step."""
        window, bs = self.sliding_window, self.block_size
        assert window is not None
        for seq, first in zip(seqs, first_queries, strict=True):
            gone = (first - window + 1) // bs  # window_start_block, unclamped: < 0 frees nothing
            if gone > seq.nulls:
                self._release(self.table.null_entries(seq.row, seq.nulls, gone))
                seq.nulls = gone


def common_hit(managers: Sequence[BlockManager], keys: Sequence[prefix_key.BlockKey], limit: int | None = None) -> int:
    """The most of ``keys``' blocks (at most ``limit``) that every manager of one pool (one per
    layer group) can start a sequence with: each one's longest hit up to the others', until they
    agree (a full group needs every block, a sliding one those in its window). Looks only; call
    it under the pool's lock, with whatever takes the blocks."""
    while True:
        hits = [m.prefix_cache.longest_hit(keys, m.sliding_window, limit) for m in managers]
        if min(hits) == max(hits):
            return hits[0]
        limit = min(hits)
