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

Layer groups (sliding-window and full layers, :class:`~pagedkv.LayerGroup`): a block
holds one group's layers, so each group stores its own blocks, under keys of its own
(the block's key chained with the group's index: ``sha256(b"pagedkv layer group" | index
as uint32 LE | digest)``) and with its layers and window in the fingerprint, so that no
group is ever served another's block. A prompt takes from a store the run of blocks that
every group finds there (each group needs all of them: a loaded block enters its prefix
cache), appended in every group or in none.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence
from typing import Any

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


class _Group:
    """One layer group's side of the tiers: its manager's events, store keys and fingerprint."""

    def __init__(self, tiers: Tiers, manager: BlockManager, index: int | None, layers: Sequence[int]) -> None:
        self.tiers, self.manager, self.index, self.layers = tiers, manager, index, list(layers)
        self.namespace = manager.prefix_cache.namespace
        self.log = EventLog()
        manager.block_pool.subscribe(self.log if not tiers.write_back else self._on_event)
        self.loaded: set[bytes] = set()  # digests that came from a store: not written back
        self.known: dict[bytes, BlockKey] = {}  # write-back: the keys of blocks cached in the pool

    def store_key(self, key: BlockKey) -> BlockKey:
        """The key a store keeps this group's copy of block ``key`` under (the key itself without groups)."""
        if self.index is None:
            return key
        tag = b"pagedkv layer group" + struct.pack("<I", self.index)
        return BlockKey(hashlib.sha256(tag + key.digest).digest(), key.token_ids)

    def fingerprint(self) -> dict[str, Any]:
        """The pool's fingerprint, with this group's layers and window when there are groups."""
        fp = fingerprint(self.tiers.pool)
        if self.index is not None:
            fp["layer_group"] = {"layers": self.layers, "sliding_window": self.manager.sliding_window}
        return fp

    def encode(self, fp: dict[str, Any], block: int, key: BlockKey) -> tuple[BlockKey, bytes]:
        """``(store key, value)`` of block ``block``, read from the pool now."""
        stored = self.store_key(key)
        return stored, encode_pool_block(self.tiers.pool, block, stored, fp, self.tiers.checksum)

    def _on_event(self, e: object) -> None:
        """Write-back: remember cached keys; read a block's value as it leaves the pool (called
        under the pool's lock, before anyone can write the block again)."""
        if getattr(e, "namespace", None) != self.namespace:
            return
        if isinstance(e, BlockStored) and e.block_hash not in self.loaded:
            self.known[e.block_hash] = BlockKey(e.block_hash, e.token_ids)
        elif isinstance(e, BlockRemoved) and e.block_hash in self.known:
            key = self.known.pop(e.block_hash)
            self.tiers.evicted.append(self.encode(self.fingerprint(), e.block_id, key))

    def write_back_all(self) -> None:
        """Write-back: queue every block the pool still caches for this group."""
        fp = self.fingerprint()
        for key, block in self.manager.block_pool.cached_keys(self.namespace).items():
            if isinstance(key, BlockKey) and key.digest in self.known:
                del self.known[key.digest]
                self.tiers.evicted.append(self.encode(fp, block, key))

    def cached_since(self) -> list[tuple[BlockKey, bytes]]:
        """Write-through: the values of the blocks this group cached since the last call."""
        items, fp = [], None
        for e in self.log.take():
            if not isinstance(e, BlockStored) or e.namespace != self.namespace or e.block_hash in self.loaded:
                continue
            key = BlockKey(e.block_hash, e.token_ids)
            if self.manager.block_pool.lookup(self.namespace, key) != e.block_id:
                continue  # evicted or re-cached since: its contents may be another block's now
            fp = self.fingerprint() if fp is None else fp  # once a flush (fp8 scales may change between)
            items.append(self.encode(fp, e.block_id, key))
        return items

    def fetch(self, store: BlockStore, keys: Sequence[BlockKey], fp: dict[str, Any]) -> list[StoredBlock]:
        """The longest run of ``keys``' blocks, from the first, that ``store`` serves whole for this
        group (``fp``: its :meth:`fingerprint`)."""
        wanted = [self.store_key(k) for k in keys]
        n = store.longest_prefix(wanted)
        verify, valid = not _trusted(store), []
        for k, v in zip(wanted[:n], store.get(wanted[:n]), strict=True):
            stored = decode_block(self.tiers.pool, k, v, fp, verify=verify)
            if stored is None:  # not whole, not this key's, another pool's or group's: a miss from here on
                break
            valid.append(stored)
        return valid


class Tiers:
    """The stores behind a cache's prefix cache (one manager per layer group), over a pool on the
    host or a GPU (whose blocks come over to the host, a run per layer and K or V, to be stored,
    and go back when loaded)."""

    def __init__(self, pool: KVPool, managers: BlockManager | Sequence[BlockManager], stores: Sequence[BlockStore],
                 *, write_back: bool = False, layers: Sequence[Sequence[int]] | None = None) -> None:
        managers = [managers] if isinstance(managers, BlockManager) else list(managers)
        self.pool, self.stores, self.write_back = pool, list(stores), write_back
        #: values carry a checksum unless every store is trusted (keeps them in this process's memory)
        self.checksum = not all(_trusted(s) for s in self.stores)
        self.evicted: list[tuple[BlockKey, bytes]] = []  # write-back: values read as they left the pool
        self.tokens = {"pool": 0, **{s.name: 0 for s in self.stores}}  # prompt tokens served per tier
        grouped = len(managers) > 1
        layers = layers if layers is not None else [range(pool.config.num_layers)] * len(managers)
        self.groups = [_Group(self, m, i if grouped else None, layers[i]) for i, m in enumerate(managers)]
        self.manager = managers[0]

    def write_back_all(self) -> int:
        """Write-back: store every block the pool still caches (before a reset forgets them)."""
        for g in self.groups:
            g.write_back_all()
        return self.flush()

    def flush(self) -> int:
        """Write the blocks cached (write-through) or evicted (write-back) since the last flush
        to every store; returns how many."""
        items, self.evicted = self.evicted, []
        for g in self.groups:
            items += g.cached_since()
        for store in self.stores:
            store.put(items)
        return len(items)

    def load(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: object) -> int:
        """After ``seq_id`` took its pool prefix (the same length in every group): load the next
        full blocks of its prompt found in the stores; returns the tokens loaded."""
        bs = self.manager.block_size
        have = self.manager.context_len(seq_id)
        self.tokens["pool"] += have
        keys = self.manager.prompt_keys(token_ids, cache_salt)  # never the last token's block: the model computes it
        loaded, fps = 0, [g.fingerprint() for g in self.groups]
        for store in self.stores:
            start = have // bs
            runs = [g.fetch(store, keys[start:], fp) for g, fp in zip(self.groups, fps, strict=True)]
            good = min(len(r) for r in runs)
            if not good:
                continue
            with self.manager.block_pool.lock:  # no other manager finds the blocks before their K/V are in
                if not self._append_everywhere(seq_id, have, good * bs):
                    break  # no room: the model computes them
                for g, run in zip(self.groups, runs, strict=True):
                    table = g.manager.block_table(seq_id)
                    for j, stored in enumerate(run[:good]):
                        write_block(self.pool, table[start + j], stored)
                        g.loaded.add(keys[start + j].digest)
            self.tokens[store.name] += good * bs
            have += good * bs
            loaded += good * bs
        return loaded

    def _append_everywhere(self, seq_id: Hashable, have: int, n: int) -> bool:
        """``n`` more tokens for ``seq_id`` in every group, or in none (False: the pool is full)."""
        done: list[BlockManager] = []
        for g in self.groups:
            try:
                g.manager.append(seq_id, n)  # the prompt's ids are known: they enter the prefix cache
            except OutOfBlocksError:
                for m in done:
                    m.truncate(seq_id, have)
                return False
            done.append(g.manager)
        return True

    def stats(self) -> dict[str, object]:
        """Prompt tokens served by each tier, and each store's own counts."""
        return {"tokens": dict(self.tokens), **{s.name: s.stats() for s in self.stores}}
