"""The read-only views of a :class:`~pagedkv.BlockManager`'s sequences that kernels and
callers take (block tables, lengths, FlashInfer's page lists): the mixin :class:`SequenceViews`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from ..errors import ArgumentError, ContextLengthError, InvariantError
from ..geometry.layout import INT32_MAX, cdiv, window_start_block
from .block_pool import BlockPool
from .block_table import BlockTable
from .prefix_cache import PrefixCache
from .sequence import SequenceState


class SequenceViews:
    """Views of the sequences of a manager (which provides the attributes below), and its
    invariants (:meth:`check`)."""

    table: BlockTable
    block_size: int
    block_pool: BlockPool
    sliding_window: int | None
    prefix_cache: PrefixCache
    _get: Callable[[Hashable], SequenceState]  # the manager's: a sequence's state, or UnknownSequenceError
    _seqs: dict[Hashable, SequenceState]
    _owner: int
    _copy_sources: list[int]
    _deferred: list[int]
    _in_flight: bool

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
