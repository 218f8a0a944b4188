"""Sequences to blocks: :class:`BlockManager`, with copy-on-write forks and a prefix cache.

The manager never touches K/V data. It answers "where do these tokens go?"
(slots), "where are this sequence's tokens?" (block tables and context
lengths), and "which blocks must be copied before writing?" (copy-on-write),
and the caller moves the data with a backend.

Rules it keeps:

- A sequence of ``n`` tokens holds exactly ``ceil(n / block_size)`` blocks.
- A block is written only if its one holder is the writer and it is not in
  the prefix cache; otherwise the writer gets a fresh copy first, reported
  as a ``(src, dst)`` pair to apply with ``copy_blocks`` before writing.
- A call that fails changes nothing: it raises before any state moves.

Prefix cache (vLLM's automatic prefix caching): a full block whose token
ids are known is entered under the key ``(parent, salt, token ids)``, where
``parent`` is the generation number of the previous block's entry (never
reused, so evicting a parent orphans its children) and ``salt`` keeps
tenants apart. A dict lookup compares the whole key on a hash hit, so a
hash collision can never serve another prompt's K/V. When its last holder
lets go, a cached block is parked in the allocator's LRU list, still valid,
and evicted only when an allocation needs it.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Hashable, Iterable, NamedTuple, Sequence

import numpy as np

from .allocator import BlockAllocator
from .errors import ConfigError, InvariantError, PagedKVError, UnknownSequenceError


class SequenceExistsError(PagedKVError, ValueError):
    """``add_sequence`` with an id already in use."""


class Appended(NamedTuple):
    """What an append hands back.

    Attributes:
        slots: int64 ``[T]``, where each new token's K/V goes (a slot mapping).
        copy_src, copy_dst: int64 ``[N]``, block copies to apply with
            ``copy_blocks`` *before* writing the new tokens (copy-on-write).
    """

    slots: np.ndarray
    copy_src: np.ndarray
    copy_dst: np.ndarray


_NO_BLOCKS = np.zeros(0, dtype=np.int64)


@dataclass(slots=True)
class _Entry:
    """A prefix-cache entry: the block holding one full block's worth of known tokens."""

    key: tuple
    block: int
    generation: int


@dataclass(slots=True)
class _Sequence:
    row: int  # this sequence's row in the manager's block-table array
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    # Known ids of positions 0..len-1 (a prompt may run ahead of num_tokens); a token
    # appended without an id ends the list, and with it caching for this sequence.
    token_ids: list[int] = field(default_factory=list)
    salt: Hashable = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    generations: list[int] = field(default_factory=list)  # entry generation of each full cached block


class BlockManager:
    """Block tables, token counts, copy-on-write and prefix caching for one model.

    Args:
        block_size: tokens per block (the pool's ``block_size``).
        allocator: a :class:`BlockAllocator` to share with other managers;
            or pass ``num_blocks`` for a private one.
        num_blocks: size of a private allocator.
        enable_prefix_caching: reuse cached full blocks of earlier prompts.
    """

    def __init__(self, block_size: int, allocator: BlockAllocator | None = None, *,
                 num_blocks: int | None = None, enable_prefix_caching: bool = True) -> None:
        if int(block_size) != block_size or block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        if (allocator is None) == (num_blocks is None):
            raise ConfigError("pass exactly one of allocator and num_blocks")
        self.block_size = int(block_size)
        self.allocator = allocator if allocator is not None else BlockAllocator(num_blocks)
        self.allocator.register(self)
        self.enable_prefix_caching = enable_prefix_caching
        self._seqs: dict[Hashable, _Sequence] = {}
        # Every sequence's blocks also live in one int32 array (a row each, -1 past its end),
        # kept in step with the lists, so block_tables() is one fancy-index, not a loop.
        self._table = np.full((8, 8), -1, dtype=np.int32)
        self._free_rows = list(range(7, -1, -1))
        self._next_id = itertools.count()
        self._cache: dict[tuple, _Entry] = {}  # key -> entry
        self._cached_block: dict[int, _Entry] = {}  # block -> entry
        self._generation = itertools.count(1)  # 0 names "no parent"
        self.prefix_hits = 0  # full prompt blocks found in the cache
        self.prefix_misses = 0  # full prompt blocks looked up and not found

    def __repr__(self) -> str:
        return (f"BlockManager(block_size={self.block_size}, sequences={len(self._seqs)}, "
                f"{self.allocator!r})")

    # -- sequences ---------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable = None, *, prompt_token_ids: Sequence[int] | None = None,
                     cache_salt: Hashable = None) -> Hashable:
        """Start a sequence and return its id (a new int unless ``seq_id`` is given).

        With ``prompt_token_ids``, the longest run of the prompt's full blocks
        already in the prefix cache is attached at once: the sequence starts
        with that many tokens (see :meth:`num_cached_tokens`), and the rest of
        the prompt is appended as usual. The last prompt token is never taken
        from the cache, so that the model computes it (its logits are needed).
        ``cache_salt`` keeps the cached prefixes of different tenants apart.
        """
        with self.allocator.lock:
            if seq_id is None:
                seq_id = next(self._next_id)
                while seq_id in self._seqs:
                    seq_id = next(self._next_id)
            elif seq_id in self._seqs:
                raise SequenceExistsError(f"sequence {seq_id!r} exists already")
            ids = None if prompt_token_ids is None else [operator.index(t) for t in prompt_token_ids]
            seq = _Sequence(self._take_row(), salt=cache_salt)
            if ids is not None:
                seq.token_ids = ids
                if self.enable_prefix_caching:
                    self._attach_cached_prefix(seq)
                    self._write_row(seq, 0)
            self._seqs[seq_id] = seq
            return seq_id

    def _attach_cached_prefix(self, seq: _Sequence) -> None:
        # Lookup and revival happen under the allocator's lock, in one go: no
        # allocation can evict a block between finding it and taking it.
        bs, ids = self.block_size, seq.token_ids
        parent = 0
        for j in range((len(ids) - 1) // bs):  # full blocks before the last prompt token
            entry = self._cache.get((parent, seq.salt, tuple(ids[j * bs:(j + 1) * bs])))
            if entry is None:
                self.prefix_misses += (len(ids) - 1) // bs - j
                break
            self.prefix_hits += 1
            if self.allocator.is_parked(entry.block):
                self.allocator.revive(entry.block)
            else:
                self.allocator.incref(entry.block)
            seq.blocks.append(entry.block)
            seq.generations.append(entry.generation)
            parent = entry.generation
        seq.num_tokens = seq.num_cached_tokens = len(seq.blocks) * bs

    def fork(self, seq_id: Hashable, child_id: Hashable = None) -> Hashable:
        """A new sequence sharing every block and token of ``seq_id``; returns its id.

        Nothing is copied now: the first append of either into their shared,
        partly filled last block reports the copy to make.
        """
        with self.allocator.lock:
            parent = self._get(seq_id)
            child_id = self.add_sequence(child_id, cache_salt=parent.salt)
            child = self._seqs[child_id]
            for block in parent.blocks:
                self.allocator.incref(block)
            child.blocks = list(parent.blocks)
            self._write_row(child, 0)
            child.num_tokens = parent.num_tokens
            child.token_ids = list(parent.token_ids)
            child.generations = list(parent.generations)
            return child_id

    def free(self, seq_id: Hashable) -> int:
        """End a sequence; returns how many blocks went back to the pool.

        Blocks still shared with another sequence stay; cached blocks are
        parked (still valid for the prefix cache) and count as returned.
        """
        with self.allocator.lock:
            seq = self._get(seq_id)
            returned = sum(self._release(block) == 0 for block in reversed(seq.blocks))
            self._table[seq.row, :len(seq.blocks)] = -1
            self._free_rows.append(seq.row)
            del self._seqs[seq_id]
            return returned

    def truncate(self, seq_id: Hashable, new_len: int) -> int:
        """Roll a sequence back to its first ``new_len`` tokens (rejected speculative tokens).

        Blocks no longer needed are released; returns how many went back to
        the pool. A kept, now partly filled block that is shared or cached is
        copied on the next append, so no one else's tokens are overwritten.
        """
        with self.allocator.lock:
            seq = self._get(seq_id)
            new_len = operator.index(new_len)
            if not 0 <= new_len <= seq.num_tokens:
                raise PagedKVError(
                    f"cannot truncate sequence {seq_id!r} of {seq.num_tokens} tokens to {new_len}"
                )
            keep = math.ceil(new_len / self.block_size)
            returned = sum(self._release(block) == 0 for block in reversed(seq.blocks[keep:]))
            self._table[seq.row, keep:len(seq.blocks)] = -1
            del seq.blocks[keep:]
            seq.num_tokens = new_len
            del seq.token_ids[new_len:]
            del seq.generations[new_len // self.block_size:]
            seq.num_cached_tokens = min(seq.num_cached_tokens, new_len)
            return returned

    def reset(self) -> None:
        """Free every sequence of this manager and forget its prefix cache."""
        with self.allocator.lock:
            for seq_id in list(self._seqs):
                self.free(seq_id)
            for block in list(self._cached_block):
                self._forget(block)
                if self.allocator.is_parked(block):
                    self.allocator.unpark(block)
            self.prefix_hits = self.prefix_misses = 0

    # -- appending ---------------------------------------------------------------------------

    def append(self, seq_id: Hashable, n: int, token_ids: Sequence[int] | None = None) -> Appended:
        """Make room for ``n`` more tokens of one sequence; see :meth:`append_batch`."""
        return self.append_batch([seq_id], [n], None if token_ids is None else [token_ids])

    def append_batch(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray,
                     token_ids: Sequence[Sequence[int] | None] | None = None) -> Appended:
        """Make room for ``counts[i]`` more tokens of each ``seq_ids[i]``: one decode or prefill step.

        Returns the slot mapping of all new tokens, sequence after sequence,
        and the block copies to apply first (copy-on-write). All or nothing:
        if the pool cannot hold every sequence's tokens, OutOfBlocksError is
        raised and no sequence changes.

        ``token_ids[i]`` (optional) are the ids of sequence i's new tokens,
        which lets the blocks they fill enter the prefix cache; a prompt's
        own ids are known already. A full block is entered into the cache
        when this call fills it, so its K/V must be written before any
        attention reads it (in the same step, as a decode loop does).
        """
        with self.allocator.lock:
            seqs, counts = self._check_batch(seq_ids, counts, token_ids)
            plan, fresh = self._plan(seqs, counts)
            new_blocks = self.allocator.allocate(fresh)  # the only step that can fail
            return self._apply(seqs, counts, token_ids, plan, new_blocks)

    def can_append(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray) -> bool:
        """Whether :meth:`append_batch` with these arguments would find enough blocks now."""
        with self.allocator.lock:
            seqs, counts = self._check_batch(seq_ids, counts, None)
            return self.allocator.can_allocate(self._plan(seqs, counts)[1])

    def _check_batch(self, seq_ids, counts, token_ids):
        seqs = [self._get(s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise PagedKVError("a sequence appears twice in one append_batch")
        counts = [operator.index(n) for n in counts]
        if len(counts) != len(seqs):
            raise PagedKVError(f"{len(counts)} counts for {len(seqs)} sequences")
        if any(n < 0 for n in counts):
            raise PagedKVError(f"token counts must be >= 0, got {min(counts)}")
        if token_ids is not None:
            if len(token_ids) != len(seqs):
                raise PagedKVError(f"{len(token_ids)} token-id lists for {len(seqs)} sequences")
            for seq_id, seq, n, ids in zip(seq_ids, seqs, counts, token_ids):
                if ids is None:
                    continue
                if len(ids) != n:
                    raise PagedKVError(f"sequence {seq_id!r}: {len(ids)} token ids for {n} tokens")
                known = seq.token_ids[seq.num_tokens:seq.num_tokens + n]
                if list(ids[:len(known)]) != known:
                    raise PagedKVError(f"sequence {seq_id!r}: token ids differ from its prompt")
        return seqs, counts

    def _plan(self, seqs, counts) -> tuple[list[tuple[bool, int]], int]:
        """Per sequence: (copy its last block first?, new blocks needed); and the total to allocate."""
        bs, plan, total = self.block_size, [], 0
        shared = {}  # holders of a last block, as the earlier sequences of this batch leave it
        for seq, n in zip(seqs, counts):
            cow = False
            if n and seq.num_tokens % bs:  # the last block is partly filled: we write into it
                last = seq.blocks[-1]
                holders = shared.get(last, self.allocator.ref_count(last))
                if holders > 1 or last in self._cached_block:
                    cow = True
                    shared[last] = holders - 1
            grow = math.ceil((seq.num_tokens + n) / bs) - len(seq.blocks)
            plan.append((cow, grow))
            total += grow + cow
        return plan, total

    def _apply(self, seqs, counts, token_ids, plan, new_blocks) -> Appended:
        bs = self.block_size
        fresh = iter(new_blocks)
        src, dst = [], []
        starts, rows = [], []
        for i, (seq, n, (cow, grow)) in enumerate(zip(seqs, counts, plan)):
            if cow:
                copy = next(fresh)
                src.append(seq.blocks[-1])
                dst.append(copy)
                self._release(seq.blocks[-1])
                seq.blocks[-1] = copy
                self._table[seq.row, len(seq.blocks) - 1] = copy
            if grow:
                seq.blocks.extend(itertools.islice(fresh, grow))
                self._write_row(seq, len(seq.blocks) - grow)
            starts.append(seq.num_tokens)
            rows.append(seq.blocks)
            self._note_tokens(seq, n, None if token_ids is None else token_ids[i])
        slots = _slots(rows, starts, counts, bs)
        for seq in seqs:
            self._cache_full_blocks(seq)
        return Appended(slots, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64))

    def _note_tokens(self, seq: _Sequence, n: int, ids) -> None:
        known = len(seq.token_ids)
        if ids is not None and seq.num_tokens <= known < seq.num_tokens + n:  # no gap before them
            seq.token_ids.extend(operator.index(t) for t in ids[known - seq.num_tokens:])
        seq.num_tokens += n

    # -- the block-table array ---------------------------------------------------------------

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self._table.shape[0]
            self._table = np.concatenate([self._table, np.full_like(self._table, -1)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _write_row(self, seq: _Sequence, start: int) -> None:
        """Copy ``seq.blocks[start:]`` into its row, widening the array when needed."""
        n = len(seq.blocks)
        if n > self._table.shape[1]:
            wider = np.full((self._table.shape[0], max(n, 2 * self._table.shape[1])), -1, dtype=np.int32)
            wider[:, :self._table.shape[1]] = self._table
            self._table = wider
        self._table[seq.row, start:n] = seq.blocks[start:]

    # -- prefix cache ------------------------------------------------------------------------

    def _cache_full_blocks(self, seq: _Sequence) -> None:
        """Enter the sequence's newly filled blocks whose token ids are known."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_tokens, len(seq.token_ids)) // bs
        for j in range(len(seq.generations), full):
            parent = seq.generations[j - 1] if j else 0
            key = (parent, seq.salt, tuple(seq.token_ids[j * bs:(j + 1) * bs]))
            entry = self._cache.get(key)
            block = seq.blocks[j]
            if entry is None and block not in self._cached_block:
                entry = _Entry(key, block, next(self._generation))
                self._cache[key] = entry
                self._cached_block[block] = entry
            elif entry is None:  # this block is cached under another key: cannot chain further
                return
            seq.generations.append(entry.generation)

    def _release(self, block: int) -> int:
        """Drop this manager's hold on ``block``; a cached block is parked, not freed."""
        on_evict = self._forget if block in self._cached_block else None
        return self.allocator.decref(block, on_evict)

    def _forget(self, block: int) -> None:
        entry = self._cached_block.pop(block)
        del self._cache[entry.key]

    # -- views for kernels -------------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"no sequence {seq_id!r} in this manager") from None

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of one sequence, in token order (a copy)."""
        return list(self._get(seq_id).blocks)

    def context_len(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds."""
        return self._get(seq_id).num_tokens

    def num_cached_tokens(self, seq_id: Hashable) -> int:
        """Prompt tokens that came from the prefix cache when the sequence was added."""
        return self._get(seq_id).num_cached_tokens

    def block_tables(self, seq_ids: Iterable[Hashable], max_blocks: int | None = None) -> np.ndarray:
        """int32 ``[B, max_blocks]`` block tables, padded with -1 (never read by a kernel).

        ``max_blocks`` defaults to the longest table among ``seq_ids``.
        """
        seqs = [self._get(s) for s in seq_ids]
        longest = max((len(s.blocks) for s in seqs), default=0)
        width = longest if max_blocks is None else max_blocks
        if longest > width:
            raise PagedKVError(f"a sequence holds {longest} blocks, more than max_blocks={width}")
        rows = np.fromiter((s.row for s in seqs), dtype=np.intp, count=len(seqs))
        if width <= self._table.shape[1]:
            return self._table[rows, :width]
        out = np.full((len(seqs), width), -1, dtype=np.int32)
        out[:, :self._table.shape[1]] = self._table[rows]
        return out

    def context_lens(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """int32 ``[B]`` token counts."""
        return np.array([self._get(s).num_tokens for s in seq_ids], dtype=np.int32)

    def to_flashinfer(self, seq_ids: Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequences in FlashInfer's paged format: ``(kv_indptr, kv_indices, kv_last_page_len)``.

        int32 each: sequence b's pages are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
        and its last page holds ``kv_last_page_len[b]`` tokens (0 for an empty sequence).
        """
        seqs = [self._get(s) for s in seq_ids]
        indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum([len(s.blocks) for s in seqs], out=indptr[1:])
        indices = np.array([b for s in seqs for b in s.blocks], dtype=np.int32)
        last = np.array([(s.num_tokens - 1) % self.block_size + 1 if s.num_tokens else 0 for s in seqs],
                        dtype=np.int32)
        return indptr, indices, last

    # -- numbers -----------------------------------------------------------------------------

    @property
    def seq_ids(self) -> list[Hashable]:
        """Ids of the live sequences, oldest first."""
        return list(self._seqs)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now (free, or cached and evictable)."""
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by some sequence (of any manager sharing the allocator)."""
        return self.allocator.num_used

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use."""
        return self.allocator.num_used / self.allocator.num_blocks

    def stats(self) -> dict[str, float | int]:
        """Counts for logs and dashboards."""
        with self.allocator.lock:
            return self._stats()

    def _stats(self) -> dict[str, float | int]:
        looked_up = self.prefix_hits + self.prefix_misses
        return {
            "sequences": len(self._seqs),
            "tokens": sum(s.num_tokens for s in self._seqs.values()),
            "blocks_total": self.allocator.num_blocks,
            "blocks_used": self.allocator.num_used,
            "blocks_free": self.allocator.num_free,
            "blocks_cached": len(self._cached_block),
            "blocks_cached_idle": sum(map(self.allocator.is_parked, self._cached_block)),
            "usage": self.usage,
            "prefix_hits": self.prefix_hits,
            "prefix_misses": self.prefix_misses,
            "prefix_hit_rate": self.prefix_hits / looked_up if looked_up else 0.0,
        }

    # -- invariants --------------------------------------------------------------------------

    def _held_blocks(self) -> Iterable[int]:
        for seq in self._seqs.values():
            yield from seq.blocks

    def check(self) -> None:
        """Verify every invariant; raise :class:`~pagedkv.InvariantError` at the first broken one.

        Checked: the allocator's (each block exactly one of free, parked or
        held, counts equal the table entries naming it over every manager
        sharing it); each sequence holds exactly the blocks its tokens need;
        every cache entry is consistent and its block held or parked; a
        parked block is in some manager's cache.
        """
        with self.allocator.lock:
            self.allocator.check()
            bs = self.block_size
            for seq_id, seq in self._seqs.items():
                if len(seq.blocks) != math.ceil(seq.num_tokens / bs):
                    raise InvariantError(
                        f"sequence {seq_id!r} has {seq.num_tokens} tokens in {len(seq.blocks)} blocks"
                    )
                if len(seq.generations) > seq.num_tokens // bs:
                    raise InvariantError(f"sequence {seq_id!r} chains more cached blocks than it has full")
                row = self._table[seq.row]
                if row[:len(seq.blocks)].tolist() != seq.blocks or (row[len(seq.blocks):] != -1).any():
                    raise InvariantError(f"sequence {seq_id!r}: block-table array row differs from its blocks")
            for key, entry in self._cache.items():
                if entry.key != key or self._cached_block.get(entry.block) is not entry:
                    raise InvariantError(f"prefix-cache entry of block {entry.block} is inconsistent")
                if self.allocator.ref_count(entry.block) == 0 and not self.allocator.is_parked(entry.block):
                    raise InvariantError(f"cached block {entry.block} is on the free stack")
            if len(self._cached_block) != len(self._cache):
                raise InvariantError("prefix-cache maps disagree in size")
            for block in self.allocator._parked:
                if not any(block in m._cached_block for m in self.allocator._managers):
                    raise InvariantError(f"parked block {block} is in no prefix cache")


def _slots(rows: list[list[int]], starts: list[int], counts: list[int], block_size: int) -> np.ndarray:
    """Slots of ``counts[i]`` tokens from position ``starts[i]`` of each block table ``rows[i]``, vectorised."""
    total = sum(counts)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if all(n == 1 for n in counts):  # a decode step: one token each, no array work needed
        return np.array([row[p // block_size] * block_size + p % block_size for row, p in zip(rows, starts)],
                        dtype=np.int64)
    which = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    positions = np.asarray(starts, dtype=np.int64)[which] + np.arange(total) - first[which]
    width = max(map(len, rows))
    table = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return table[which, positions // block_size] * block_size + positions % block_size
