"""A pool's prefix cache backed by slower stores: :class:`Tiers` (used by :class:`~pagedkv.PagedKVCache`).

Write-through (the default): every full block entering the pool's prefix cache is
written to each store once its step has ended (its K/V are written by then).
Write-back: a cached block is written only when it leaves the pool's prefix
cache, evicted for another allocation (its K/V are read at that moment, before
the new holder writes) or at the cache's reset or close. Lookup: a new
prompt takes what the pool caches, then the longest run of its next full blocks
found in the stores, in their order (host, disk, Redis...), loaded into blocks
allocated for the sequence in the same call (nothing can evict them in
between). A value that is not whole, not the key's, or from a pool of another
geometry or format is a miss (see :mod:`pagedkv.stores`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from . import prefix_key
from .errors import OutOfBlocksError
from .events import BlockRemoved, BlockStored, EventLog
from .manager import BlockManager
from .pool import KVPool
from .prefix_key import BlockKey
from .stored_block import StoredBlock, decode_block, encode_pool_block, fingerprint, write_block
from .stores import BlockStore


def _trusted(store: BlockStore) -> bool:
    """Whether ``store`` keeps values in this process's memory (see :mod:`pagedkv.stores`)."""
    return getattr(store, "trusted", False) is True


class Tiers:
    """The stores behind one manager's prefix cache, over a pool on the host or a GPU (whose blocks
    come over to the host, a run per layer and K or V, to be stored, and go back when loaded)."""

    def __init__(self, pool: KVPool, manager: BlockManager, stores: Sequence[BlockStore], *,
                 write_back: bool = False) -> None:
        self.pool, self.manager, self.stores, self.write_back = pool, manager, list(stores), write_back
        self.log = EventLog()
        manager.block_pool.subscribe(self.log if not write_back else self._on_event)
        self.loaded: set[bytes] = set()  # digests that came from a store: not written back
        self.known: dict[bytes, BlockKey] = {}  # write-back: the keys of blocks cached in the pool
        self.evicted: list[tuple[BlockKey, bytes]] = []  # write-back: values read as they left the pool
        self.tokens = {"pool": 0, **{s.name: 0 for s in self.stores}}  # prompt tokens served per tier
        #: values carry a checksum unless every store is trusted (keeps them in this process's memory)
        self.checksum = not all(_trusted(s) for s in self.stores)

    def _encode(self, fp: dict[str, object], block: int, key: BlockKey) -> bytes:
        """Block ``block``'s value, read from the pool now."""
        return encode_pool_block(self.pool, block, key, fp, self.checksum)

    def _on_event(self, e: object) -> None:
        """Write-back: remember cached keys; read a block's value as it leaves the pool (called
        under the pool's lock, before anyone can write the block again)."""
        if getattr(e, "namespace", None) != self.manager.prefix_cache.namespace:
            return
        if isinstance(e, BlockStored) and e.block_hash not in self.loaded:
            self.known[e.block_hash] = BlockKey(e.block_hash, e.token_ids)
        elif isinstance(e, BlockRemoved) and e.block_hash in self.known:
            key = self.known.pop(e.block_hash)
            self.evicted.append((key, self._encode(fingerprint(self.pool), e.block_id, key)))

    def write_back_all(self) -> int:
        """Write-back: store every block the pool still caches (before a reset forgets them)."""
        namespace, fp = self.manager.prefix_cache.namespace, fingerprint(self.pool)
        for key, block in self.manager.block_pool.cached_keys(namespace).items():
            if isinstance(key, BlockKey) and key.digest in self.known:
                del self.known[key.digest]
                self.evicted.append((key, self._encode(fp, block, key)))
        return self.flush()

    def flush(self) -> int:
        """Write the blocks cached (write-through) or evicted (write-back) since the last flush
        to every store; returns how many."""
        namespace = self.manager.prefix_cache.namespace
        items, self.evicted = self.evicted, []
        fp: dict[str, object] | None = None
        for e in self.log.take():
            if not isinstance(e, BlockStored) or e.namespace != namespace or e.block_hash in self.loaded:
                continue
            key = BlockKey(e.block_hash, e.token_ids)
            if self.manager.block_pool.lookup(namespace, key) != e.block_id:
                continue  # evicted or re-cached since: its contents may be another block's now
            fp = fingerprint(self.pool) if fp is None else fp  # once a flush (fp8 scales may change between)
            items.append((key, self._encode(fp, e.block_id, key)))
        for store in self.stores:
            store.put(items)
        return len(items)

    def load(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: object) -> int:
        """After ``seq_id`` took its pool prefix: load the next full blocks of its prompt found in
        the stores; returns the tokens loaded."""
        bs = self.manager.block_size
        token_ids = prefix_key.token_ids(token_ids, "prompt_token_ids")  # as the manager took them: ints
        have = self.manager.context_len(seq_id)
        self.tokens["pool"] += have
        wanted = (len(token_ids) - 1) // bs  # never the block of the last token: the model computes it
        keys: list[BlockKey] = []
        extras = prefix_key.salt_extras(cache_salt)
        for j in range(wanted):
            keys.append(prefix_key.block_key(keys[-1] if keys else None, token_ids[j * bs:(j + 1) * bs],
                                             () if j else extras))
        loaded, fp = 0, fingerprint(self.pool)
        for store in self.stores:
            start = have // bs
            n = store.longest_prefix(keys[start:])
            valid: list[StoredBlock] = []
            for k, v in zip(keys[start:start + n], store.get(keys[start:start + n]), strict=True):
                stored = decode_block(self.pool, k, v, fp, verify=not _trusted(store))
                if stored is None:  # not whole, not this key's, another pool's: a miss from here on
                    break
                valid.append(stored)
            good = len(valid)
            if not good:
                continue
            try:
                self.manager.append(seq_id, good * bs)  # the prompt's ids are known: they enter the prefix cache
            except OutOfBlocksError:
                break  # no room: the model computes them
            table = self.manager.block_table(seq_id)
            for j, stored in enumerate(valid):
                write_block(self.pool, table[start + j], stored)
                self.loaded.add(stored.key.digest)
            self.tokens[store.name] += good * bs
            have += good * bs
            loaded += good * bs
        return loaded

    def stats(self) -> dict[str, object]:
        """Prompt tokens served by each tier, and each store's own counts."""
        return {"tokens": dict(self.tokens), **{s.name: s.stats() for s in self.stores}}
