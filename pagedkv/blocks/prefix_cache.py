"""One manager's side of the prefix cache: :class:`PrefixCache`.

The index itself (key -> block, the LRU of idle cached blocks) lives in the
:class:`~pagedkv.blocks.block_pool.BlockPool`, namespaced per manager; the keys are
:mod:`pagedkv.blocks.prefix_key`'s. This class applies them to a sequence's tokens:
it finds and takes the longest cached run of a new prompt's full blocks, and
enters blocks into the index as they fill. It keeps the hit and miss counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvariantError
from ..geometry.layout import window_start_block
from . import prefix_key
from .block_pool import BlockPool
from .prefix_key import BlockKey


class PrefixCache:
    """Prefix caching for the owner ``namespace`` of ``block_pool`` (switched off unless ``enabled``)."""

    def __init__(self, block_pool: BlockPool, namespace: int, block_size: int, enabled: bool = True) -> None:
        self.block_pool, self.namespace, self.block_size, self.enabled = block_pool, namespace, block_size, enabled
        self.hits = 0  # full prompt blocks found in the cache
        self.misses = 0  # full prompt blocks looked up and not found

    def key(self, keys: Sequence[BlockKey], token_ids: Sequence[int], extras: tuple[bytes, ...]) -> BlockKey:
        """The key of full block ``j = len(keys)`` of a sequence whose first ``j`` blocks have ``keys``."""
        j, bs = len(keys), self.block_size
        return prefix_key.block_key(keys[-1] if j else None, token_ids[j * bs:(j + 1) * bs], () if j else extras)

    def prompt_keys(self, token_ids: Sequence[int], extras: tuple[bytes, ...]) -> list[BlockKey]:
        """The keys of a prompt's full blocks, leaving out the block of its last token (the
        model must compute that token); O(prompt length)."""
        keys: list[BlockKey] = []
        for _ in range((len(token_ids) - 1) // self.block_size if self.enabled else 0):
            keys.append(self.key(keys, token_ids, extras))
        return keys

    def needed(self, num_blocks: int, window: int | None) -> int:
        """The first of a sequence's first ``num_blocks`` blocks that its next query (at position
        ``num_blocks * block_size``) reads: 0, or under a sliding ``window`` the first block
        with a position inside it (those before are never read again)."""
        return window_start_block(num_blocks * self.block_size, window, self.block_size)

    def longest_hit(self, keys: Sequence[BlockKey], window: int | None = None, limit: int | None = None) -> int:
        """The most of ``keys``' blocks (at most ``limit``) that a new sequence can start with:
        full attention needs every block of the prefix cached; a sliding ``window`` only those
        its next query reads (vLLM's hybrid rule: earlier ones may be gone). Looks, takes nothing."""
        present = [self.block_pool.lookup(self.namespace, k) is not None for k in keys[:limit]]
        if window is None:
            return present.index(False) if False in present else len(present)
        for n in range(len(present), 0, -1):
            if all(present[self.needed(n, window):n]):
                return n
        return 0

    def take_prefix(self, keys: Sequence[BlockKey], num_blocks: int, window: int | None = None,
                    retention: tuple[int, float | None] = (0, None)) -> list[int]:
        """Take (one reference each, for this namespace) the first ``num_blocks`` blocks of
        ``keys``, as :meth:`longest_hit` allows; returns their ids, -1 for those before the
        ``window`` (not taken). ``retention`` (priority, time to live) raises the blocks'
        retention (see :mod:`pagedkv.blocks.retention`). Call :meth:`longest_hit` and this under
        the pool's lock, in one go: no allocation may evict a block between them.
        """
        first = self.needed(num_blocks, window)
        blocks = [-1] * first
        for key in keys[first:num_blocks]:
            block = self.block_pool.lookup(self.namespace, key)
            if block is None:
                raise InvariantError("a cached block found by longest_hit is gone: call both under the pool's lock")
            self.block_pool.take_cached(block, self.namespace)
            if retention[0]:
                self.block_pool.retain(block, *retention)
            blocks.append(block)
        self.hits += num_blocks
        self.misses += len(keys) - num_blocks
        return blocks

    def has_new_full_blocks(self, keys: Sequence[BlockKey], token_ids: Sequence[int], num_tokens: int) -> bool:
        """Whether a sequence has filled blocks with known token ids past its ``keys`` (a cheap
        test, so that a decode step looks at no block list when none filled)."""
        return self.enabled and min(num_tokens, len(token_ids)) // self.block_size > len(keys)

    def enter_full_blocks(self, keys: list[BlockKey], token_ids: Sequence[int], new_blocks: Sequence[int],
                          num_tokens: int, extras: tuple[bytes, ...],
                          retention: tuple[int, float | None] = (0, None)) -> None:
        """Enter a sequence's newly filled blocks whose token ids are known, extending ``keys``;
        ``new_blocks`` are its blocks from number ``len(keys)`` on; ``retention`` as for :meth:`take_prefix`."""
        if not self.has_new_full_blocks(keys, token_ids, num_tokens):
            return
        full, first = min(num_tokens, len(token_ids)) // self.block_size, len(keys)
        while len(keys) < full:
            key = self.key(keys, token_ids, extras)
            if new_blocks[len(keys) - first] < 0:
                return  # freed out of a sliding window before its ids were known: the chain ends
            # Another block may hold these tokens already: the chain goes on through the key.
            self.block_pool.cache(self.namespace, key, new_blocks[len(keys) - first], keys[-1] if keys else None)
            named = self.block_pool.lookup(self.namespace, key)  # this block, or another holding these tokens
            if named is None:
                return  # this block is cached under another key: it cannot chain further
            if retention[0]:
                self.block_pool.retain(named, *retention)
            keys.append(key)

    def reset(self) -> None:
        """Forget every entry of this namespace and the counts."""
        self.block_pool.forget_namespace(self.namespace)
        self.hits = self.misses = 0

    def stats(self) -> dict[str, float | int]:
        """``prefix_hits``, ``prefix_misses`` (full prompt blocks found or not) and ``prefix_hit_rate``."""
        looked_up = self.hits + self.misses
        return {"prefix_hits": self.hits, "prefix_misses": self.misses,
                "prefix_hit_rate": self.hits / looked_up if looked_up else 0.0}
