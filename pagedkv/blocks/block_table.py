"""Every sequence's blocks in one persistent int32 array: :class:`BlockTable`.

Kernels want block tables as one int32 ``[B, max_blocks]`` array. Building it
from per-sequence lists every step costs a Python loop over the batch, so
the rows live in one array from the start (vLLM v1's ``BlockTable``): a
sequence owns a row, appends write into it, and the tables of a step are one
fancy-index. Entries past a row's length are -1 (never read by a kernel), and so are the
leading entries of a sliding-window group's row whose blocks left the window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..geometry.layout import page_lists, table_slot, token_slots


class BlockTable:
    """Rows of block ids, one per sequence, growing in both directions as needed."""

    def __init__(self, rows: int = 8, width: int = 8) -> None:
        self._table = np.full((rows, width), -1, dtype=np.int32)
        self._lens = [0] * rows  # blocks in each row
        self._free_rows = list(range(rows - 1, -1, -1))

    # -- rows --------------------------------------------------------------------------------

    def add_row(self) -> int:
        """A new, empty row (the array doubles when every row is taken)."""
        if not self._free_rows:
            rows = self._table.shape[0]
            self._table = np.concatenate([self._table, np.full_like(self._table, -1)])
            self._lens += [0] * rows
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def clear_row(self, row: int) -> None:
        """Empty ``row`` and give it back."""
        self._table[row, :self._lens[row]] = -1
        self._lens[row] = 0
        self._free_rows.append(row)

    def append_row(self, row: int, blocks: Sequence[int]) -> None:
        """Add ``blocks`` at the end of ``row`` (the array widens when needed)."""
        start, end = self._lens[row], self._lens[row] + len(blocks)
        if end > self._table.shape[1]:
            wider = np.full((self._table.shape[0], max(end, 2 * self._table.shape[1])), -1, dtype=np.int32)
            wider[:, :self._table.shape[1]] = self._table
            self._table = wider
        self._table[row, start:end] = blocks
        self._lens[row] = end

    def set_block(self, row: int, j: int, block: int) -> None:
        """Replace entry ``j`` of ``row`` (a copy-on-write)."""
        self._table[row, j] = block

    def truncate_row(self, row: int, n: int) -> list[int]:
        """Keep the first ``n`` blocks of ``row``; returns the ones dropped, in order."""
        dropped = self._table[row, n:self._lens[row]].tolist()
        self._table[row, n:self._lens[row]] = -1
        self._lens[row] = min(n, self._lens[row])
        return dropped

    # -- views -------------------------------------------------------------------------------

    def blocks(self, row: int, start: int = 0) -> list[int]:
        """The blocks of ``row`` from entry ``start`` on, in token order (a copy)."""
        return self._table[row, start:self._lens[row]].tolist()

    def num_blocks(self, row: int) -> int:
        """Blocks in ``row``."""
        return self._lens[row]

    def last_block(self, row: int) -> int:
        """The last block of a non-empty ``row``."""
        return self._table.item(row, self._lens[row] - 1)

    def rows(self, rows: Sequence[int], width: int) -> np.ndarray:
        """int32 ``[len(rows), width]``, padded with -1; a view-free copy when it fits."""
        index = np.asarray(rows, dtype=np.intp)
        if width <= self._table.shape[1]:
            return self._table[index, :width]
        out = np.full((len(index), width), -1, dtype=np.int32)
        out[:, :self._table.shape[1]] = self._table[index]
        return out

    def slot_mapping(self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int],
                     block_size: int) -> np.ndarray:
        """Slots of ``counts[i]`` tokens from position ``starts[i]`` of each row: int64 ``[sum(counts)]``.

        O(number of tokens): it reads only the entries the tokens land in.
        """
        if sum(counts) <= 16:  # a few tokens: plain Python beats numpy's per-call overhead
            bs = np.int64(block_size)  # int64 arithmetic: no int32 overflow
            return np.array([table_slot(self._table, r, p, bs) for r, start, n in zip(rows, starts, counts, strict=True)
                             for p in range(start, start + n)], dtype=np.int64)
        return token_slots(self._table, np.asarray(starts), np.asarray(counts), block_size, np.asarray(rows))

    def to_flashinfer(self, rows: Sequence[int], num_tokens: Sequence[int],
                      block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FlashInfer's paged format of ``rows`` holding ``num_tokens`` tokens (see
        :func:`pagedkv.geometry.layout.page_lists`)."""
        width = max((self._lens[r] for r in rows), default=0)
        return page_lists(self.rows(rows, width), np.asarray(num_tokens, dtype=np.int64), block_size)

    def check_row(self, row: int, blocks: int, nulls: int = 0) -> bool:
        """Whether ``row`` holds exactly ``blocks`` entries: ``nulls`` of -1 (freed out of a
        sliding window), then block ids, and -1 after them."""
        r = self._table[row]
        return self._lens[row] == blocks and bool(
            (r[:nulls] == -1).all() and (r[nulls:blocks] >= 0).all() and (r[blocks:] == -1).all())

    def null_entries(self, row: int, start: int, stop: int) -> list[int]:
        """Set entries ``start..stop-1`` of ``row`` to -1 (blocks that left a sliding window);
        returns the blocks they held."""
        dropped = self._table[row, start:stop].tolist()
        self._table[row, start:stop] = -1
        return dropped
