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

from typing import NamedTuple


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
