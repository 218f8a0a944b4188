"""Which idle cached block goes first when blocks run out: :class:`IdleBlocks`.

A cached block that no one holds waits, *idle*, keeping its K/V for a later
prefix hit, until an allocation needs it. The eviction rule:

1. the lowest retention **priority** goes first (a sequence's ``retention``;
   0 by default; a block shared or hit by several sequences keeps the highest
   priority any of them gave it);
2. a priority given with a **time to live** lasts that long: once it has run
   out, the block counts as priority 0;
3. among equal priorities, the least recently used goes first (the order in
   which blocks became idle).

So a system prompt cached with ``retention=10`` outlives any number of
one-off prompts at priority 0 (TensorRT-LLM's retention config, vLLM #38514),
and one with ``retention=10, ttl=60`` does so for a minute.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class IdleBlocks:
    """Idle cached blocks, kept per retention priority, least recently used first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._levels: dict[int, OrderedDict[int, None]] = {}  # priority -> its idle blocks, oldest first
        self._level_of: dict[int, int] = {}  # idle block -> its priority level
        self._priority: dict[int, int] = {}  # cached block -> priority (blocks at 0 are absent)
        self._expiry: dict[int, float] = {}  # cached block -> when its priority runs out
        self._since: dict[int, int] = {}  # idle block -> when it became idle (a counter)
        self._ticks = 0
        self.clock = clock

    def __len__(self) -> int:
        return len(self._level_of)

    def __contains__(self, block: int) -> bool:
        return block in self._level_of

    def retain(self, block: int, priority: int, ttl: float | None = None) -> None:
        """Raise a cached block's priority to ``priority`` (kept until ``ttl`` seconds from now,
        if given; for good otherwise). A lower priority than it has changes nothing."""
        now = self.clock()
        current = self.priority(block, now)
        if priority < current or priority <= 0:
            return
        expiry = now + ttl if ttl is not None else float("inf")
        if priority == current:
            expiry = max(expiry, self._expiry.get(block, float("inf") if current > 0 else 0.0))
        self._priority[block], self._expiry[block] = priority, expiry
        if block in self._level_of:  # an idle block moves to its new level, keeping when it became idle
            since = self._since[block]
            self.remove(block)
            self.add(block, since)

    def priority(self, block: int, now: float | None = None) -> int:
        """The block's priority now (0 once its time to live has run out)."""
        p = self._priority.get(block, 0)
        if p and self._expiry[block] <= (self.clock() if now is None else now):
            return 0
        return p

    def add(self, block: int, since: int | None = None) -> None:
        """``block`` became idle (now, unless ``since`` says when)."""
        if since is None:
            self._ticks += 1
            since = self._ticks
        level = self.priority(block)
        blocks = self._levels.setdefault(level, OrderedDict())
        newest = next(reversed(blocks), None)
        blocks[block] = None
        self._level_of[block], self._since[block] = level, since
        if newest is not None and self._since[newest] > since:  # an older block joins: keep the idle order
            order = sorted(blocks, key=self._since.__getitem__)
            blocks.clear()
            blocks.update(dict.fromkeys(order))

    def remove(self, block: int) -> None:
        """``block`` is idle no more (taken by a hit, or uncached)."""
        level = self._level_of.pop(block)
        del self._since[block]
        del self._levels[level][block]
        if not self._levels[level]:
            del self._levels[level]

    def forget(self, block: int) -> None:
        """``block`` left the cache: drop its priority."""
        self._priority.pop(block, None)
        self._expiry.pop(block, None)

    def pop_victim(self) -> int:
        """Remove and return the block to evict now, by the rule of the module docstring."""
        now = self.clock()
        for level in [p for p in self._levels if p > 0]:
            expired = [b for b in self._levels[level] if self._expiry[b] <= now]
            for block in expired:  # its time to live ran out: it joins priority 0, keeping when it became idle
                since = self._since[block]
                self.remove(block)
                self.forget(block)
                self.add(block, since)
        block = next(iter(self._levels[min(self._levels)]))
        self.remove(block)
        return block
