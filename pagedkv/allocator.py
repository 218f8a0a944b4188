"""Which blocks are free, and who holds the rest: :class:`BlockAllocator`."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable

from .errors import AllocatorError, BlockIndexError, OutOfBlocksError


class BlockAllocator:
    """A free stack of block ids with reference counts, safe to share between threads.

    - ``allocate(n)`` takes n blocks or none (O(1) each); a taken block has
      reference count 1.
    - ``incref`` shares a block (a fork, a prefix-cache hit); ``decref`` drops
      one holder, and the block is free again when none is left.
    - A block whose last holder lets go but whose contents are worth keeping
      (a full block in a prefix cache) can be *parked* instead of freed: it
      waits in an LRU list, still counted as free, and is evicted (oldest
      first, its owner told through a callback) only when the free stack is
      empty. ``revive`` takes a parked block back with count 1.

    One allocator can serve several :class:`~pagedkv.BlockManager` objects
    (several models drawing from one pool). Every method holds ``lock``, a
    re-entrant lock that managers also hold around their compound operations,
    so that nothing can evict a block between a prefix lookup and its use.

    Raises:
        OutOfBlocksError: fewer blocks available than asked for (nothing is taken).
        AllocatorError: a block freed twice, freed without being allocated, or
            shared while free.
        BlockIndexError: a block id outside ``0..num_blocks - 1``.
    """

    def __init__(self, num_blocks: int) -> None:
        if int(num_blocks) != num_blocks or num_blocks <= 0:
            raise AllocatorError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = int(num_blocks)
        self.lock = threading.RLock()
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._refs = [0] * self.num_blocks
        self._ever_allocated = [False] * self.num_blocks
        self._parked: OrderedDict[int, Callable[[int], None]] = OrderedDict()  # oldest first
        self._managers: weakref.WeakSet = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"BlockAllocator({self.num_blocks} blocks, {self.num_free} free, {len(self._parked)} cached)"

    # -- questions ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones plus parked (evictable) ones."""
        return len(self._free) + len(self._parked)

    @property
    def num_used(self) -> int:
        """Blocks with at least one holder."""
        return self.num_blocks - self.num_free

    @property
    def num_parked(self) -> int:
        """Free blocks that still hold prefix-cache contents."""
        return len(self._parked)

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now."""
        return n <= self.num_free

    def ref_count(self, block: int) -> int:
        """Holders of ``block`` (0 when free or parked)."""
        return self._refs[self._check(block)]

    def is_parked(self, block: int) -> bool:
        """Whether ``block`` is free but keeps its prefix-cache contents."""
        return self._check(block) in self._parked

    # -- actions -----------------------------------------------------------------------------

    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` blocks, each with reference count 1: all of them or, failing that, none.

        Free blocks go first; then parked blocks are evicted, oldest first.
        """
        if n < 0:
            raise AllocatorError(f"cannot allocate {n} blocks")
        with self.lock:
            if n > self.num_free:
                raise OutOfBlocksError(
                    f"asked for {n} blocks, {self.num_free} of {self.num_blocks} are free"
                )
            blocks = []
            for _ in range(n):
                if self._free:
                    block = self._free.pop()
                else:
                    block, on_evict = self._parked.popitem(last=False)
                    on_evict(block)
                self._refs[block] = 1
                self._ever_allocated[block] = True
                blocks.append(block)
            return blocks

    def incref(self, block: int) -> int:
        """Add a holder to an allocated block; returns the new count."""
        with self.lock:
            block = self._check(block)
            if self._refs[block] == 0:
                raise AllocatorError(f"block {block} is free; only an allocated block can be shared")
            self._refs[block] += 1
            return self._refs[block]

    def decref(self, block: int, on_evict: Callable[[int], None] | None = None) -> int:
        """Drop one holder; returns the new count.

        At zero the block is free again, or, with ``on_evict``, parked: it
        keeps its contents until an allocation needs it, and then
        ``on_evict(block)`` is called first.
        """
        with self.lock:
            block = self._check(block)
            if self._refs[block] == 0:
                if self._ever_allocated[block]:
                    raise AllocatorError(f"block {block} is freed twice")
                raise AllocatorError(f"block {block} was never allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if on_evict is None:
                    self._free.append(block)
                else:
                    self._parked[block] = on_evict
            return self._refs[block]

    free = decref

    def revive(self, block: int) -> None:
        """Take a parked block back, with reference count 1 (a prefix-cache hit)."""
        with self.lock:
            if self._parked.pop(self._check(block), None) is None:
                raise AllocatorError(f"block {block} is not parked")
            self._refs[block] = 1

    def unpark(self, block: int) -> None:
        """Forget a parked block's contents: it becomes plainly free."""
        with self.lock:
            if self._parked.pop(self._check(block), None) is None:
                raise AllocatorError(f"block {block} is not parked")
            self._free.append(block)

    def _check(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise BlockIndexError(f"block {block} is outside 0..{self.num_blocks - 1}")
        return block

    # -- invariants --------------------------------------------------------------------------

    def register(self, manager) -> None:
        """Note a manager drawing from this allocator, so :meth:`check` can count its holds."""
        self._managers.add(manager)

    def holds(self) -> list[int]:
        """How many block-table entries, over every registered manager, name each block."""
        counts = [0] * self.num_blocks
        for manager in list(self._managers):
            for block in manager._held_blocks():
                counts[block] += 1
        return counts

    def check(self) -> None:
        """Raise :class:`~pagedkv.InvariantError` unless every block is exactly one of free,
        parked or held, and each held block's count equals the tables naming it."""
        from .errors import InvariantError

        with self.lock:
            free = set(self._free)
            if len(free) != len(self._free):
                raise InvariantError("a block is on the free stack twice")
            both = free & set(self._parked)
            if both:
                raise InvariantError(f"block {min(both)} is both free and parked")
            holds = self.holds()
            for block in range(self.num_blocks):
                idle = block in free or block in self._parked
                if idle == (self._refs[block] > 0):
                    state = "free or parked" if idle else "neither free nor held"
                    raise InvariantError(f"block {block} has count {self._refs[block]} but is {state}")
                if self._refs[block] != holds[block]:
                    raise InvariantError(
                        f"block {block} has count {self._refs[block]} but {holds[block]} "
                        "block-table entries name it"
                    )
