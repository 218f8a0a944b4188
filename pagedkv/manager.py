"""Sequences to blocks: :class:`BlockManager`, with copy-on-write forks and a prefix cache.

The manager never touches K/V data. It answers "where do these tokens go?"
(slots), "where are this sequence's tokens?" (block tables and context
lengths), and "which blocks must be copied before writing?" (copy-on-write);
the caller moves the data with a backend. It keeps the sequences and plans
their appends; the rest lives below it, each part checking its own invariants:
:mod:`~pagedkv.block_pool` (free blocks, reference counts, the cache index),
:mod:`~pagedkv.block_table` (the int32 rows), :mod:`~pagedkv.prefix_cache` and
:mod:`~pagedkv.prefix_key` (which cached block holds which prefix).

Rules it keeps:

- A sequence of ``n`` tokens holds exactly ``ceil(n / block_size)`` blocks.
- A block is written only if its one holder is the writer and it is not in
  the prefix cache; otherwise the writer gets a fresh copy first, reported
  as a ``(src, dst)`` pair to apply with ``copy_blocks`` before writing.
- An append is planned (every argument checked, every block counted) before
  anything moves, then applied: a call that fails changes nothing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import prefix_key
from .block_pool import BlockPool
from .block_table import BlockTable
from .errors import ArgumentError, ConfigError, InvariantError, SequenceExistsError, UnknownSequenceError
from .layout import cdiv
from .prefix_cache import PrefixCache
from .prefix_key import BlockKey


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


@dataclass(slots=True)
class _Sequence:
    row: int  # this sequence's row of the block table
    num_tokens: int = 0
    # Known ids of positions 0..len-1 (a prompt may run ahead of num_tokens); a token
    # appended without an id ends the list, and with it caching for this sequence.
    token_ids: list[int] = field(default_factory=list)
    extras: tuple[bytes, ...] = ()  # the first block's extra keys (its cache salt)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    keys: list[BlockKey] = field(default_factory=list)  # keys of its first len(keys) full blocks


def _count(n: object, what: str) -> int:
    if type(n) is int and n >= 0:  # the common case, checked first: this runs once per sequence per step
        return n
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ArgumentError(f"{what} must be an integer, got {n!r}")
    if n < 0:
        raise ArgumentError(f"{what} must be >= 0, got {n}")
    return int(n)


class BlockManager:
    """Block tables, token counts, copy-on-write and prefix caching for one model.

    Args:
        block_size: tokens per block (the pool's ``block_size``).
        block_pool: a :class:`BlockPool` to share with other managers; or pass
            ``num_blocks`` for a private one.
        num_blocks: size of a private pool.
        enable_prefix_caching: reuse cached full blocks of earlier prompts.
    """

    def __init__(self, block_size: int, block_pool: BlockPool | None = None, *,
                 num_blocks: int | None = None, enable_prefix_caching: bool = True) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        if (block_pool is None) == (num_blocks is None):
            raise ConfigError("pass exactly one of block_pool and num_blocks")
        self.block_size = block_size
        self.block_pool = block_pool if block_pool is not None else BlockPool(num_blocks)  # type: ignore[arg-type]
        self._owner = self.block_pool.new_owner()  # its holds, and its namespace of cache keys
        self.prefix_cache = PrefixCache(self.block_pool, self._owner, block_size, enable_prefix_caching)
        self.table = BlockTable()
        self._seqs: dict[Hashable, _Sequence] = {}
        self._next_id = itertools.count()

    def __repr__(self) -> str:
        return f"BlockManager(block_size={self.block_size}, sequences={len(self._seqs)}, {self.block_pool!r})"

    # -- sequences ---------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable = None, *, prompt_token_ids: Sequence[int] | None = None,
                     cache_salt: object = None) -> Hashable:
        """Start a sequence and return its id (a new int unless ``seq_id`` is given).

        With ``prompt_token_ids``, the longest run of the prompt's full blocks
        already in the prefix cache is attached at once: the sequence starts
        with that many tokens (see :meth:`num_cached_tokens`), and the rest of
        the prompt is appended as usual. The last prompt token is never taken
        from the cache, so that the model computes it (its logits are needed).
        ``cache_salt`` (str, bytes, int, float or bool) keeps the cached
        prefixes of different tenants apart.
        """
        ids = None if prompt_token_ids is None else prefix_key.token_ids(prompt_token_ids, "prompt_token_ids")
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
            seq = _Sequence(self.table.add_row(), extras=extras, token_ids=ids or [])
            blocks, seq.keys = self.prefix_cache.take_prefix(seq.token_ids, extras)
            self.table.append_row(seq.row, blocks)
            seq.num_tokens = seq.num_cached_tokens = len(blocks) * self.block_size
            self._seqs[seq_id] = seq
            return seq_id

    def fork(self, seq_id: Hashable, child_id: Hashable = None) -> Hashable:
        """A new sequence sharing every block and token of ``seq_id``; returns its id.

        Nothing is copied now: the first append of either into their shared,
        partly filled last block reports the copy to make.
        """
        with self.block_pool.lock:
            parent = self._get(seq_id)
            child_id = self.add_sequence(child_id)
            child = self._seqs[child_id]
            blocks = self.table.blocks(parent.row)
            for block in blocks:
                self.block_pool.incref(block, self._owner)
            self.table.append_row(child.row, blocks)
            child.num_tokens, child.extras = parent.num_tokens, parent.extras
            child.token_ids, child.keys = list(parent.token_ids), list(parent.keys)
            return child_id

    def free(self, seq_id: Hashable) -> int:
        """End a sequence; returns how many blocks went back to the pool.

        Blocks still shared with another sequence stay; cached blocks wait idle
        (still valid for the prefix cache) and count as returned.
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
        """
        with self.block_pool.lock:
            seq = self._get(seq_id)
            new_len = _count(new_len, "new_len")
            if new_len > seq.num_tokens:
                raise ArgumentError(f"cannot truncate sequence {seq_id!r} of {seq.num_tokens} tokens to {new_len}")
            returned = self._release(self.table.truncate_row(seq.row, cdiv(new_len, self.block_size)))
            seq.num_tokens = new_len
            del seq.token_ids[new_len:]
            del seq.keys[new_len // self.block_size:]
            seq.num_cached_tokens = min(seq.num_cached_tokens, new_len)
            return returned

    def reset(self) -> None:
        """Free every sequence of this manager and forget its prefix cache."""
        with self.block_pool.lock:
            for seq_id in list(self._seqs):
                self.free(seq_id)
            self.prefix_cache.reset()

    def _release(self, blocks: list[int]) -> int:
        """Drop this manager's hold on each block, last first; returns how many went back."""
        return sum(self.block_pool.decref(b, self._owner) == 0 for b in reversed(blocks))

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
        """
        with self.block_pool.lock:
            seqs, counts, ids = self._check_batch(seq_ids, counts, token_ids)
            plan, fresh = self._plan(seqs, counts)
            new_blocks = self.block_pool.allocate(fresh, self._owner)  # the only step that can fail
            return self._apply(seqs, counts, ids, plan, new_blocks)

    def can_append(self, seq_ids: Sequence[Hashable], counts: Sequence[int] | np.ndarray) -> bool:
        """Whether :meth:`append_batch` with these arguments would find enough blocks now."""
        with self.block_pool.lock:
            seqs, counts, _ = self._check_batch(seq_ids, counts, None)
            return self.block_pool.can_allocate(self._plan(seqs, counts)[1])

    def _check_batch(self, seq_ids, counts, token_ids) -> tuple[list[_Sequence], list[int], list]:
        seqs = [self._get(s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ArgumentError("a sequence appears twice in one append_batch")
        counts = [_count(n, "a token count") for n in counts]
        if len(counts) != len(seqs):
            raise ArgumentError(f"{len(counts)} counts for {len(seqs)} sequences")
        ids: list = [None] * len(seqs)
        if token_ids is not None:
            if len(token_ids) != len(seqs):
                raise ArgumentError(f"{len(token_ids)} token-id lists for {len(seqs)} sequences")
            for i, (seq_id, seq, n, given) in enumerate(zip(seq_ids, seqs, counts, token_ids, strict=True)):
                if given is None:
                    continue
                ids[i] = prefix_key.token_ids(given, f"token ids of sequence {seq_id!r}")
                if len(ids[i]) != n:
                    raise ArgumentError(f"sequence {seq_id!r}: {len(ids[i])} token ids for {n} tokens")
                known = seq.token_ids[seq.num_tokens:seq.num_tokens + n]
                if ids[i][:len(known)] != known:
                    raise ArgumentError(f"sequence {seq_id!r}: token ids differ from its prompt")
        return seqs, counts, ids

    def _plan(self, seqs: list[_Sequence], counts: list[int]) -> tuple[list[tuple[bool, int]], int]:
        """Per sequence: (copy its last block first?, new blocks needed); and the total to allocate."""
        bs, plan, total = self.block_size, [], 0
        shared: dict[int, int] = {}  # holders of a last block, as the earlier sequences of this batch leave it
        for seq, n in zip(seqs, counts, strict=True):
            cow = False
            if n and seq.num_tokens % bs:  # the last block is partly filled: we write into it
                last = self.table.last_block(seq.row)
                if self.block_pool.must_copy_before_write(last, shared.get(last)):
                    cow = True
                    shared[last] = shared.get(last, self.block_pool.ref_count(last)) - 1
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
                self._release([last])
            if grow:
                self.table.append_row(seq.row, list(itertools.islice(fresh, grow)))
            starts.append(seq.num_tokens)
            known = len(seq.token_ids)
            if given is not None and seq.num_tokens <= known < seq.num_tokens + n:  # no gap before them
                seq.token_ids.extend(given[known - seq.num_tokens:])
            seq.num_tokens += n
        slots = self.table.slot_mapping([s.row for s in seqs], starts, counts, self.block_size)
        for seq in seqs:
            if self.prefix_cache.has_new_full_blocks(seq.keys, seq.token_ids, seq.num_tokens):
                self.prefix_cache.enter_full_blocks(seq.keys, seq.token_ids, self.table.blocks(seq.row),
                                                    seq.num_tokens, seq.extras)
        return Appended(slots, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64))

    # -- views for kernels -------------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"no sequence {seq_id!r} in this manager") from None

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of one sequence, in token order (a copy)."""
        return self.table.blocks(self._get(seq_id).row)

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
        rows = [self._get(s).row for s in seq_ids]
        longest = max((self.table.num_blocks(r) for r in rows), default=0)
        width = longest if max_blocks is None else max_blocks
        if longest > width:
            raise ArgumentError(f"a sequence holds {longest} blocks, more than max_blocks={width}")
        return self.table.rows(rows, width)

    def context_lens(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """int32 ``[B]`` token counts."""
        return np.array([self._get(s).num_tokens for s in seq_ids], dtype=np.int32)

    def to_flashinfer(self, seq_ids: Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequences in FlashInfer's paged format: ``(kv_indptr, kv_indices, kv_last_page_len)``.

        int32 each: sequence b's pages are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
        and its last page holds ``kv_last_page_len[b]`` tokens (0 for an empty sequence).
        """
        seqs = [self._get(s) for s in seq_ids]
        return self.table.to_flashinfer([s.row for s in seqs], [s.num_tokens for s in seqs], self.block_size)

    # -- numbers -----------------------------------------------------------------------------

    @property
    def seq_ids(self) -> list[Hashable]:
        """Ids of the live sequences, oldest first."""
        return list(self._seqs)

    def stats(self) -> dict[str, float | int]:
        """Counts for logs and dashboards (the block counts are the whole pool's)."""
        with self.block_pool.lock:
            return {
                "sequences": len(self._seqs),
                "tokens": sum(s.num_tokens for s in self._seqs.values()),
                "blocks_total": self.block_pool.num_blocks,
                "blocks_used": self.block_pool.num_used,
                "blocks_free": self.block_pool.num_free,
                "blocks_cached": self.block_pool.num_cached,
                "blocks_cached_idle": self.block_pool.num_idle,
                "usage": self.block_pool.num_used / self.block_pool.num_blocks,
                "prefix_hits": self.prefix_cache.hits,
                "prefix_misses": self.prefix_cache.misses,
                "prefix_hit_rate": self.prefix_cache.hit_rate,
            }

    # -- invariants --------------------------------------------------------------------------

    def check(self) -> None:
        """Verify every invariant; raise :class:`~pagedkv.InvariantError` at the first broken one.

        Checked: the pool's own (see :meth:`BlockPool.check`); each sequence
        holds exactly the blocks its tokens need, in its table row; it chains
        no more cached blocks than it has full; and the references this
        manager holds in the pool are exactly its table entries.
        """
        with self.block_pool.lock:
            self.block_pool.check()
            held: Counter[int] = Counter()
            for seq_id, seq in self._seqs.items():
                blocks = cdiv(seq.num_tokens, self.block_size)
                if not self.table.check_row(seq.row, blocks):
                    raise InvariantError(f"sequence {seq_id!r} has {seq.num_tokens} tokens but its table row "
                                         f"is {self.table.blocks(seq.row)}")
                if len(seq.keys) > seq.num_tokens // self.block_size:
                    raise InvariantError(f"sequence {seq_id!r} chains more cached blocks than it has full")
                held.update(self.table.blocks(seq.row))
            if held != self.block_pool.holds(self._owner):
                raise InvariantError("this manager's references in the pool differ from its block-table entries")
