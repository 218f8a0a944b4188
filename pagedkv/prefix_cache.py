"""One manager's side of the prefix cache: :class:`PrefixCache`.

The index itself (key -> block, the LRU of idle cached blocks) lives in the
:class:`~pagedkv.block_pool.BlockPool`, namespaced per manager; the keys are
:mod:`pagedkv.prefix_key`'s. This class applies them to a sequence's tokens:
it finds and takes the longest cached run of a new prompt's full blocks, and
enters blocks into the index as they fill. It keeps the hit and miss counts.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def take_prefix(self, token_ids: Sequence[int], extras: tuple[bytes, ...],
                    retention: tuple[int, float | None] = (0, None)) -> tuple[list[int], list[BlockKey]]:
        """Take (one reference each, for this namespace) the longest run of cached full blocks a
        prompt starts with, leaving out the block of its last token (the model must compute
        that token); returns the blocks and their keys. ``retention`` (priority, time to
        live) raises the blocks' retention (see :mod:`pagedkv.retention`).

        Lookup and taking happen under the pool's lock, in one go: no
        allocation can evict a block between finding it and taking it.
        """
        blocks: list[int] = []
        keys: list[BlockKey] = []
        if not self.enabled:
            return blocks, keys
        wanted = (len(token_ids) - 1) // self.block_size
        with self.block_pool.lock:
            for j in range(wanted):
                key = self.key(keys, token_ids, extras)
                block = self.block_pool.lookup(self.namespace, key)
                if block is None:
                    self.misses += wanted - j
                    break
                self.hits += 1
                self.block_pool.take_cached(block, self.namespace)
                if retention[0]:
                    self.block_pool.retain(block, *retention)
                blocks.append(block)
                keys.append(key)
        return blocks, keys

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
