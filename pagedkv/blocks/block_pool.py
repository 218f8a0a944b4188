"""Which blocks are free, who holds the rest, and which hold cached prefixes: :class:`BlockPool`.

One object owns everything about a block's life (vLLM v1's ``BlockPool``):

- a free stack: ``allocate(n)`` takes n blocks or none, O(1) each;
- reference counts, kept per *owner* (a :class:`~pagedkv.BlockManager`, or 0
  for direct use), so that each owner can check its own holds exactly;
- the prefix-cache index: ``(namespace, key) -> block`` and back. A cached
  block whose last holder lets go is not freed but waits, *idle*; it still
  counts as free and is evicted (lowest retention priority first, then least
  recently used: :mod:`pagedkv.blocks.retention`; its index entry dropped) only when
  an allocation finds the free stack empty.

Several managers (several models) may share one pool; each gets an owner id
from :meth:`BlockPool.new_owner`, which also namespaces its cache keys (two
models' K/V of one prompt differ). The pool knows nothing of managers: no
callbacks, no registry. Every method holds ``lock``, a re-entrant lock that
managers also hold around compound operations, so that nothing can evict a
block between a prefix lookup and its use.

Subscribers (:meth:`BlockPool.subscribe`) get a :mod:`pagedkv.blocks.events` event
each time a block enters or leaves the prefix cache.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable

from ..errors import AllocatorError, BlockIndexError, InvariantError, OutOfBlocksError
from .events import AllBlocksCleared, BlockRemoved, BlockStored, Event
from .retention import IdleBlocks

DIRECT = 0  #: the owner of holds taken directly, not through a manager


class BlockPool:
    """Free stack, per-owner reference counts and the prefix-cache index of ``num_blocks`` blocks.

    ``clock`` (seconds) times retention priorities given with a time to live.

    Raises:
        OutOfBlocksError: fewer blocks available than asked for (nothing is taken).
        AllocatorError: a block freed twice, freed without being allocated,
            shared while free, or released by an owner that does not hold it.
        BlockIndexError: a block id outside ``0..num_blocks - 1``.
    """

    def __init__(self, num_blocks: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise AllocatorError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.lock = threading.RLock()
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._refs = [0] * num_blocks
        self._holds: dict[int, Counter[int]] = {DIRECT: Counter()}  # owner -> block -> references
        self._ever_allocated = [False] * num_blocks
        self._index: dict[tuple[int, Hashable], int] = {}  # (namespace, key) -> block
        self._entry: dict[int, tuple[int, Hashable]] = {}  # block -> (namespace, key)
        self._idle = IdleBlocks(clock)  # cached, unheld blocks, in eviction order (see pagedkv.blocks.retention)
        self._owners = itertools.count(DIRECT + 1)
        self._abandoned: list[int] = []  # owners gone without closing (appended by finalizers)
        self._subscribers: list[Callable[[Event], object]] = []
        self._groups: dict[int, int] = {}  # owner -> the layer group its events name (absent: 0)

    def __repr__(self) -> str:
        return f"BlockPool({self.num_blocks} blocks, {self.num_free} free, {len(self._entry)} cached)"

    def subscribe(self, callback: Callable[[Event], object]) -> None:
        """Call ``callback(event)`` for every :mod:`pagedkv.blocks.events` event from now on, in order,
        under the pool's lock (so keep it short, and do not call the pool from it;
        :class:`pagedkv.blocks.events.EventLog` collects them)."""
        with self.lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[Event], object]) -> None:
        """Stop calling ``callback``."""
        with self.lock:
            self._subscribers.remove(callback)

    def _emit(self, make: Callable[[], Event]) -> None:
        if self._subscribers:
            event = make()
            for callback in self._subscribers:
                callback(event)

    def _removed(self, block: int, entry: tuple[int, Hashable]) -> None:
        self._emit(lambda: BlockRemoved(_digest(entry[1]), block, entry[0], self._groups.get(entry[0], 0)))

    def new_owner(self, group: int = 0) -> int:
        """A fresh owner id: holds taken under it are counted apart, and it names a cache namespace
        (whose KV events name layer ``group``)."""
        with self.lock:
            owner = next(self._owners)
            self._holds[owner] = Counter()
            if group:
                self._groups[owner] = group
            return owner

    def release_owner(self, owner: int) -> int:
        """Drop every reference ``owner`` holds and forget its cache entries (an owner that is
        done for good); returns how many blocks went back to the pool."""
        with self.lock:
            returned = 0
            for block, n in list(self._holds[owner].items()):
                for _ in range(n):
                    returned += self.decref(block, owner) == 0
            self.forget_namespace(owner)
            return returned

    def abandon(self, owner: int) -> None:
        """Note that ``owner`` is gone without closing (called from a finalizer, at any moment,
        on any thread: it only records, and the pool reclaims the owner's blocks at its next
        allocation or check, under its lock)."""
        self._abandoned.append(owner)  # atomic; touches nothing the lock guards

    def _reclaim(self) -> None:
        while self._abandoned:
            owner = self._abandoned.pop()
            held, cached = sum(self._holds[owner].values()), sum(ns == owner for ns, _ in self._entry.values())
            self.release_owner(owner)
            del self._holds[owner]
            self._groups.pop(owner, None)
            if held or cached:
                warnings.warn(f"a BlockManager was dropped without close(): its {held} block references and "
                              f"{cached} cached blocks went back to the pool", ResourceWarning, stacklevel=3)

    # -- questions ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones plus idle cached (evictable) ones."""
        if self._abandoned:
            with self.lock:
                self._reclaim()
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks with at least one holder."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix-cache index (held or idle)."""
        return len(self._entry)

    @property
    def num_idle(self) -> int:
        """Cached blocks that no one holds: free, but keeping their contents until evicted."""
        return len(self._idle)

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now."""
        return n <= self.num_free  # num_free reclaims abandoned owners' blocks first

    def ref_count(self, block: int) -> int:
        """Holders of ``block`` (0 when free or idle)."""
        return self._refs[self._check(block)]

    def is_cached(self, block: int) -> bool:
        """Whether ``block`` is in the prefix-cache index (its contents must not be overwritten)."""
        return self._check(block) in self._entry

    def is_idle(self, block: int) -> bool:
        """Whether ``block`` is cached and unheld: free, but keeping its contents."""
        return self._check(block) in self._idle

    def holds(self, owner: int) -> Counter[int]:
        """A copy of ``owner``'s references: block -> count."""
        with self.lock:
            return Counter(self._holds[owner])

    def stats(self) -> dict[str, float | int]:
        """Block counts: ``blocks_total``, ``blocks_used``, ``blocks_free`` (idle cached ones
        included), ``blocks_cached``, ``blocks_cached_idle`` and ``usage`` (used / total)."""
        with self.lock:
            return {"blocks_total": self.num_blocks, "blocks_used": self.num_used, "blocks_free": self.num_free,
                    "blocks_cached": len(self._entry), "blocks_cached_idle": len(self._idle),
                    "usage": self.num_used / self.num_blocks}

    def lookup(self, namespace: int, key: Hashable) -> int | None:
        """The block cached under ``key`` in ``namespace``, or None."""
        return self._index.get((namespace, key))

    # -- actions -----------------------------------------------------------------------------

    def allocate(self, n: int = 1, owner: int = DIRECT) -> list[int]:
        """Take ``n`` blocks for ``owner``, each with reference count 1: all of them or none.

        Free blocks go first; then idle cached blocks are evicted (lowest retention priority,
        then oldest, first: see :mod:`pagedkv.blocks.retention`).
        """
        if n < 0:
            raise AllocatorError(f"cannot allocate {n} blocks")
        with self.lock:
            if n > self.num_free:  # num_free reclaims abandoned owners' blocks first
                raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} of {self.num_blocks} are free")
            blocks = []
            for _ in range(n):
                if self._free:
                    block = self._free.pop()
                else:
                    block = self._idle.pop_victim()
                    entry = self._entry.pop(block)
                    del self._index[entry]
                    self._idle.forget(block)
                    self._removed(block, entry)
                self._refs[block] = 1
                self._holds[owner][block] += 1
                self._ever_allocated[block] = True
                blocks.append(block)
            return blocks

    def incref(self, block: int, owner: int = DIRECT) -> int:
        """Add a holder to a held block (a fork, a shared prefix); returns the new count."""
        with self.lock:
            if self._refs[self._check(block)] == 0:
                raise AllocatorError(f"block {block} is free; only an allocated block can be shared")
            self._refs[block] += 1
            self._holds[owner][block] += 1
            return self._refs[block]

    def take_cached(self, block: int, owner: int = DIRECT) -> None:
        """Add a holder to a cached block (a prefix-cache hit); an idle one comes back with count 1."""
        with self.lock:
            if self._check(block) not in self._entry:
                raise AllocatorError(f"block {block} is not cached")
            if block in self._idle:
                self._idle.remove(block)
            self._refs[block] += 1
            self._holds[owner][block] += 1

    def decref(self, block: int, owner: int = DIRECT) -> int:
        """Drop one of ``owner``'s references; returns the new count.

        At zero the block is free again, or idle if it is cached.
        """
        with self.lock:
            if self._refs[self._check(block)] == 0:
                if self._ever_allocated[block]:
                    raise AllocatorError(f"block {block} is freed twice")
                raise AllocatorError(f"block {block} was never allocated")
            held = self._holds[owner]
            if not held[block]:
                raise AllocatorError(f"owner {owner} holds no reference to block {block}")
            held[block] -= 1
            if not held[block]:
                del held[block]
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._entry:
                    self._idle.add(block)
                else:
                    self._free.append(block)
            return self._refs[block]

    free = decref

    def cache(self, namespace: int, key: Hashable, block: int, parent: Hashable | None = None) -> bool:
        """Enter held ``block`` under ``key``; True if ``key`` now names ``block``.

        False, changing nothing, if another block holds ``key`` already or
        ``block`` is cached under another key. ``parent`` (the previous block's
        key) is for the ``BlockStored`` event only.
        """
        with self.lock:
            if self._refs[self._check(block)] == 0:
                raise AllocatorError(f"block {block} is free; only a held block can be cached")
            entry = (namespace, key)
            if entry in self._index or block in self._entry:
                return self._index.get(entry) == block
            self._index[entry] = block
            self._entry[block] = entry
            self._emit(lambda: BlockStored(_digest(key), None if parent is None else _digest(parent),
                                           tuple(getattr(key, "token_ids", ())), len(getattr(key, "token_ids", ())),
                                           block, namespace, self._groups.get(namespace, 0)))
            return True

    def uncache(self, block: int, *, quiet: bool = False) -> None:
        """Forget ``block``'s cache entry; an idle block becomes plainly free. (``quiet``: no
        ``BlockRemoved`` event, for :meth:`forget_namespace`, which sends one event for all.)"""
        with self.lock:
            entry = self._entry.pop(self._check(block))
            del self._index[entry]
            self._idle.forget(block)
            if block in self._idle:
                self._idle.remove(block)
                self._free.append(block)
            if not quiet:
                self._removed(block, entry)

    def forget_namespace(self, namespace: int) -> None:
        """Forget every cache entry of ``namespace`` (a manager's reset): one ``AllBlocksCleared``."""
        with self.lock:
            for block in [b for b, (ns, _) in self._entry.items() if ns == namespace]:
                self.uncache(block, quiet=True)
            self._emit(lambda: AllBlocksCleared(namespace))

    def retain(self, block: int, priority: int, ttl: float | None = None) -> None:
        """Keep cached ``block`` at retention ``priority`` (for ``ttl`` seconds, or for good):
        idle blocks of lower priority are evicted first (:mod:`pagedkv.blocks.retention` states the rule)."""
        with self.lock:
            if self._check(block) not in self._entry:
                raise AllocatorError(f"block {block} is not cached; only a cached block has a retention priority")
            self._idle.retain(block, priority, ttl)

    def cached_keys(self, namespace: int) -> dict[Hashable, int]:
        """The keys cached in ``namespace`` and their blocks (a copy; O(cached blocks))."""
        with self.lock:
            return {key: block for (ns, key), block in self._index.items() if ns == namespace}

    def cached_entries(self) -> dict[tuple[int, bytes], int]:
        """Every cached block by ``(namespace, digest)`` (the names KV events use): what a
        consumer that applied every event so far knows (a copy; O(cached blocks))."""
        with self.lock:
            return {(ns, _digest(key)): block for (ns, key), block in self._index.items()}

    def _check(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise BlockIndexError(f"block {block} is outside 0..{self.num_blocks - 1}")
        return block

    # -- invariants --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`~pagedkv.InvariantError` unless every block is exactly one of free, idle
        or held, each count is the sum of its owners' references, and the index is consistent."""
        with self.lock:
            self._reclaim()
            free = set(self._free)
            if len(free) != len(self._free):
                raise InvariantError("a block is on the free stack twice")
            total: Counter[int] = Counter()
            for held in self._holds.values():
                total.update(held)
            for block in range(self.num_blocks):
                idle = block in free or block in self._idle
                if block in free and block in self._idle:
                    raise InvariantError(f"block {block} is both free and idle")
                if idle == (self._refs[block] > 0):
                    state = "free or idle" if idle else "neither free nor held"
                    raise InvariantError(f"block {block} has count {self._refs[block]} but is {state}")
                if self._refs[block] != total[block]:
                    raise InvariantError(
                        f"block {block} has count {self._refs[block]} but its owners hold {total[block]}")
                if block in self._idle and block not in self._entry:
                    raise InvariantError(f"idle block {block} is in no cache entry")
                if block in free and block in self._entry:
                    raise InvariantError(f"free block {block} is still cached")
            if len(self._index) != len(self._entry) or any(
                    self._index.get(entry) != block for block, entry in self._entry.items()):
                raise InvariantError("the prefix-cache index and its inverse disagree")


def _digest(key: Hashable) -> bytes:
    """A key's portable name in events: a prefix_key.BlockKey's digest, else its repr's bytes."""
    digest = getattr(key, "digest", None)
    return digest if isinstance(digest, bytes) else repr(key).encode()
