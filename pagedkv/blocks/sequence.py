"""One sequence's token bookkeeping: :class:`SequenceState`, the checks of the counts
and token ids an append brings (made before anything moves), and what an append hands
back (:class:`Appended`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import ArgumentError
from . import prefix_key
from .prefix_key import BlockKey


def retention(priority: object, ttl: object) -> tuple[int, float | None]:
    """A sequence's retention priority (an int >= 0) and time to live (None, or seconds > 0),
    checked (see :mod:`pagedkv.blocks.retention`)."""
    priority = count(priority, "retention")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float, np.integer, np.floating)) or not ttl > 0 \
                or ttl == float("inf"):
            raise ArgumentError(f"ttl must be None or a positive, finite number of seconds, got {ttl!r}")
        ttl = float(ttl)
    return priority, ttl


def count(n: object, what: str) -> int:
    """``n`` as a non-negative Python int (numpy integers too), or an ArgumentError: a float
    such as 1.9 is refused, never truncated."""
    if type(n) is int and n >= 0:  # the common case, checked first: this runs once per sequence per step
        return n
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ArgumentError(f"{what} must be an integer, got {n!r}")
    if n < 0:
        raise ArgumentError(f"{what} must be >= 0, got {n}")
    return int(n)


def counts(values: object, what: str) -> list[int]:
    """Each of ``values`` checked as by :func:`count`; a 1-d integer numpy array in one pass
    (a decode step's counts for hundreds of sequences)."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        if values.size and values.min() < 0:
            count(values[values < 0][0], what)  # raises, naming the value
        return values.tolist()
    return [count(n, what) for n in values]  # type: ignore[attr-defined]


@dataclass(slots=True)
class SequenceState:
    """What a block manager knows of one sequence (its blocks live in the block table)."""

    row: int  # this sequence's row of the block table
    num_tokens: int = 0
    # Known ids of positions 0..len-1 (a prompt may run ahead of num_tokens); a token
    # appended without an id ends the list, and with it caching for this sequence.
    token_ids: list[int] = field(default_factory=list)
    extras: tuple[bytes, ...] = ()  # the first block's extra keys (its cache salt)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    keys: list[BlockKey] = field(default_factory=list)  # keys of its first len(keys) full blocks
    retention: tuple[int, float | None] = (0, None)  # priority (and time to live) of its cached blocks
    nulls: int = 0  # leading table entries freed out of a sliding window (-1 in its row)

    def checked_ids(self, given: Sequence[object], n: int, name: str) -> list[int]:
        """The ids of ``n`` new tokens as ints, checked against the prompt ids known for them."""
        ids = prefix_key.token_ids(given, f"token ids of sequence {name}")
        if len(ids) != n:
            raise ArgumentError(f"sequence {name}: {len(ids)} token ids for {n} tokens")
        known = self.token_ids[self.num_tokens:self.num_tokens + n]
        if ids[:len(known)] != known:
            raise ArgumentError(f"sequence {name}: token ids differ from its prompt")
        return ids

    def add_tokens(self, n: int, ids: list[int] | None) -> None:
        """Count ``n`` new tokens; their ``ids`` (checked) extend the known ones if no gap precedes them."""
        known = len(self.token_ids)
        if ids is not None and self.num_tokens <= known < self.num_tokens + n:
            self.token_ids.extend(ids[known - self.num_tokens:])
        self.num_tokens += n

    def truncate(self, new_len: int, block_size: int) -> None:
        """Forget tokens from ``new_len`` on, with their ids and the keys of blocks no longer full."""
        self.num_tokens = new_len
        del self.token_ids[new_len:]
        del self.keys[new_len // block_size:]
        self.num_cached_tokens = min(self.num_cached_tokens, new_len)


class Appended(NamedTuple):
    """What an append hands back: ``slots`` int64 ``[T]``, where each new token's K/V goes
    (a slot mapping), and ``copy_src``, ``copy_dst`` int64 ``[N]``, block copies to apply
    with ``copy_blocks`` *before* writing the new tokens (copy-on-write)."""

    slots: np.ndarray
    copy_src: np.ndarray
    copy_dst: np.ndarray
