"""The read-only views of a :class:`~pagedkv.BlockManager`'s sequences that kernels and
callers take (block tables, lengths, FlashInfer's page lists): the mixin :class:`SequenceViews`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import numpy as np

from .block_table import BlockTable
from .errors import ArgumentError, ContextLengthError
from .layout import INT32_MAX
from .sequence import SequenceState


class SequenceViews:
    """Views of the sequences of a manager, which provides ``table``, ``block_size`` and ``_get``."""

    table: BlockTable
    block_size: int
    _get: Callable[[Hashable], SequenceState]  # the manager's: a sequence's state, or UnknownSequenceError

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of one sequence, in token order (a copy); O(its blocks)."""
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
