"""KV events: what enters and leaves the prefix cache, for a router or a storage tier.

The content of vLLM's KV events (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``): a consumer that applies them in order knows exactly
which blocks a pool's prefix cache holds, by their portable keys (the chained
sha256 digests of :mod:`pagedkv.blocks.prefix_key`), without asking the pool.

::

    log = pagedkv.EventLog()
    manager.block_pool.subscribe(log)
    ...
    for event in log.take():
        ...

Events carry the ``namespace`` of the cache they concern (a manager's owner id:
two models sharing a pool keep their prefixes apart) and a ``group`` (the layer
group; 0 while every layer shares one table).
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .block_pool import BlockPool


class BlockStored(NamedTuple):
    """A full block entered the prefix cache."""

    block_hash: bytes  #: its key's digest
    parent_block_hash: bytes | None  #: the previous block's digest (None: the first block)
    token_ids: tuple[int, ...]  #: the block's token ids
    block_size: int
    block_id: int  #: where it lies in the pool
    namespace: int
    group: int = 0


class BlockRemoved(NamedTuple):
    """A block left the prefix cache (evicted for another allocation, or uncached)."""

    block_hash: bytes
    block_id: int
    namespace: int
    group: int = 0


class AllBlocksCleared(NamedTuple):
    """Every block of ``namespace`` left the prefix cache at once (a manager's reset or close)."""

    namespace: int


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventLog:
    """A subscriber that keeps the events in order until :meth:`take`n (not thread-safe beyond
    the pool's lock, under which events arrive)."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self._events.append(event)

    def take(self) -> list[Event]:
        """The events since the last call, oldest first."""
        events, self._events = self._events, []
        return events


def replay(events: list[Event], cached: dict[tuple[int, bytes], int] | None = None) -> dict[tuple[int, bytes], int]:
    """Apply events to a map ``(namespace, block_hash) -> block_id`` of cached blocks (a new one
    by default) and return it: what a consumer of the stream knows of the cache."""
    state = {} if cached is None else cached
    for e in events:
        if isinstance(e, BlockStored):
            state[(e.namespace, e.block_hash)] = e.block_id
        elif isinstance(e, BlockRemoved):
            del state[(e.namespace, e.block_hash)]
        else:
            for entry in [k for k in state if k[0] == e.namespace]:
                del state[entry]
    return state


class Sequenced(NamedTuple):
    """An event with its number in its publisher's stream (1, 2, 3...; no gaps)."""

    seq: int
    event: Event


class EventPublisher:
    """A pool's KV events numbered so that an index built from them can be trusted.

    Every event gets the next sequence number, and the publisher has an identity, ``source``
    (a new one for every publisher: a restarted server is a new source, whose pool starts
    anew). A consumer that sees a number skip has lost events: it asks :meth:`replay` for what
    followed the last number it applied, from a buffer of the newest ``buffer`` events, or, once
    the buffer no longer reaches back that far, takes a :meth:`snapshot` of what the pool's
    prefix cache holds (with the number it is current to) and goes on from there.
    :class:`EventIndex` is such a consumer; :mod:`pagedkv.offload.kv_events` carries both over
    a Redis Stream to other processes.

    Args:
        block_pool: the pool whose events to number (subscribed at once).
        source: the publisher's identity (default: a random one).
        buffer: how many of the newest events :meth:`replay` can give again.
    """

    def __init__(self, block_pool: BlockPool, *, source: str | None = None, buffer: int = 4096) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer <= 0:
            raise ValueError(f"buffer must be a positive integer, got {buffer!r}")
        self.block_pool = block_pool
        self.source = source if source is not None else uuid.uuid4().hex
        self._seq = 0
        self._buffer: deque[Sequenced] = deque(maxlen=buffer)
        self._pending: list[Sequenced] = []
        with block_pool.lock:
            self._empty_at_start = block_pool.num_cached == 0  # replay from 0 is then the whole truth
            block_pool.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:  # under the pool's lock
        self._seq += 1
        numbered = Sequenced(self._seq, event)
        self._buffer.append(numbered)
        self._pending.append(numbered)

    @property
    def last_seq(self) -> int:
        """The number of the newest event (0 before any)."""
        return self._seq

    def take(self) -> list[Sequenced]:
        """The events since the last call, oldest first (for a sink to send on)."""
        with self.block_pool.lock:
            pending, self._pending = self._pending, []
            return pending

    def replay(self, after: int) -> list[Sequenced] | None:
        """The events numbered above ``after``, or None when the buffer no longer holds them all
        (take a :meth:`snapshot` then)."""
        with self.block_pool.lock:
            if after == 0 and not self._empty_at_start:
                return None  # its events alone never said what the pool held before them
            if after >= self._seq:
                return []
            first = self._buffer[0].seq if self._buffer else self._seq + 1
            if after + 1 < first:
                return None
            return [e for e in self._buffer if e.seq > after]

    def snapshot(self) -> tuple[int, dict[tuple[int, bytes], int]]:
        """``(seq, cached)``: every block the pool's prefix cache holds, by ``(namespace,
        digest)``, as a consumer knows it after applying events 1..seq."""
        with self.block_pool.lock:
            return self._seq, self.block_pool.cached_entries()

    def close(self) -> None:
        """Stop numbering the pool's events."""
        self.block_pool.unsubscribe(self._on_event)


class EventIndex:
    """What a consumer of one publisher's numbered events knows of its pool's prefix cache:
    ``blocks``, ``(namespace, digest) -> block``, exact as long as :meth:`apply` says so.

    :meth:`apply` takes events in order and refuses (returns False, changing nothing) one that
    does not follow the last applied: a gap, or a publisher (``source``) not seen before, whose
    history must come from a replay or a snapshot (:meth:`load`) first. Events already applied
    (a replay overlapping what arrived) are skipped.
    """

    def __init__(self) -> None:
        self.source: str | None = None
        self.seq = 0
        self.blocks: dict[tuple[int, bytes], int] = {}

    def apply(self, source: str, seq: int, event: Event) -> bool:
        if source != self.source:  # a publisher not seen before (a restart): its history first
            return False
        if seq <= self.seq:
            return True
        if seq != self.seq + 1:
            return False
        replay([event], self.blocks)
        self.seq = seq
        return True

    def load(self, source: str, seq: int, blocks: dict[tuple[int, bytes], int]) -> None:
        """Start over from a snapshot of ``source`` current to event ``seq`` (a replay from 0 of a
        publisher that started on an empty pool: ``load(source, 0, {})``, then its events)."""
        self.source, self.seq, self.blocks = source, seq, dict(blocks)
