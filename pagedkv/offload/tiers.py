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
geometry or format is a miss (see :mod:`pagedkv.offload.stores`).

Whose blocks: a store may be shared by several models (a base model and its fine-tune have
the same geometry), so every value is kept under a key of its model's, ``sha256(b"pagedkv
store key" | sha256(the fingerprint as canonical JSON) | digest)``, and carries that
fingerprint in its header: the pool's geometry, layout, format and fp8 scales, the
``model_id`` the cache was given, and the layer group's layers and window. Another model's,
format's or group's value is never found, and if a store hands one back it is a miss.

Layer groups (sliding-window and full layers, :class:`~pagedkv.LayerGroup`): a block
holds one group's layers, so each group stores its own blocks, under keys of its own. A
prompt takes from a store the run of blocks that every group finds there (each group needs
all of them: a loaded block enters its prefix cache), appended in every group or in none.

A store that fails (raises: a directory deleted under it, a store of the user's own that
breaks) warns and answers as a miss, and one that hands back a value that is not this
pool's block has it rejected (a miss, warned once per store); both are counted in
:meth:`Tiers.stats`. Nothing a store does reaches the pool, the sequences or a step.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

from ..blocks.events import AllBlocksCleared, BlockRemoved, BlockStored, EventLog
from ..blocks.manager import BlockManager
from ..blocks.prefix_key import BlockKey
from ..errors import OutOfBlocksError
from ..geometry.formats import FORMATS
from ..geometry.layout import LAYOUTS
from ..memory.pool import KVPool
from .stored_block import StoredBlock, decode_block, encode_pool_block, fingerprint, write_block
from .stores import BlockStore


def _trusted(store: BlockStore) -> bool:
    """Whether ``store`` keeps values in this process's memory (see :mod:`pagedkv.offload.stores`)."""
    return getattr(store, "trusted", False) is True


class _Identity(NamedTuple):
    """A layer group's fingerprint and the sha256 of it that its store keys are made with."""

    fp: dict[str, Any]
    tag: bytes

    @classmethod
    def of(cls, fp: dict[str, Any]) -> _Identity:
        return cls(fp, hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).digest())


class _Group:
    """One layer group's side of the tiers: its manager's events, store keys and fingerprint."""

    def __init__(self, tiers: Tiers, manager: BlockManager, index: int | None, layers: Sequence[int]) -> None:
        self.tiers, self.manager, self.index, self.layers = tiers, manager, index, list(layers)
        self.namespace = manager.prefix_cache.namespace
        self.log = EventLog()
        manager.block_pool.subscribe(self.log if not tiers.write_back else self._on_event)
        # blocks whose K/V came from a store (digest -> block), not written to the stores again; an
        # entry goes when its block leaves the pool's prefix cache, so that a block computed again
        # later is written like any other, and the map never holds more than the pool caches
        self.loaded: dict[bytes, int] = {}
        self.known: dict[bytes, BlockKey] = {}  # write-back: the keys of blocks cached in the pool

    def identity(self) -> _Identity:
        """This group's fingerprint (the pool's, the model's id, and the group's layers and window when
        there are groups) and the tag its store keys are made with; taken anew for each flush and
        lookup (fp8 scales may change between)."""
        fp = fingerprint(self.tiers.pool)
        fp["model"] = self.tiers.model_id
        if self.index is not None:
            fp["layer_group"] = {"index": self.index, "layers": self.layers,
                                 "sliding_window": self.manager.sliding_window}
        return _Identity.of(fp)

    def other_identities(self) -> list[tuple[str, _Identity]]:
        """The identities this model's blocks would have in a pool of another storage format or
        layout (fp8 with unit scales, as a pool starts), to say why a store that holds them
        serves none to this one (:mod:`pagedkv.explain`)."""
        base = self.identity()
        planes = self.tiers.pool.config.num_planes
        out = []
        for name, fmt in FORMATS.items():
            for layout in LAYOUTS:
                fp = dict(base.fp, dtype=name, layout=layout,
                          kv_scales=[[1.0, 1.0]] * planes if fmt.scale == "tensor" else None)
                if fp != base.fp:
                    scales = " (unit fp8 scales)" if name == base.fp["dtype"] and layout == base.fp["layout"] else ""
                    out.append((f"{name}, {layout}{scales}", _Identity.of(fp)))
        return out

    def store_key(self, key: BlockKey, ident: _Identity | None = None) -> BlockKey:
        """The key a store keeps block ``key`` under for this group, model and pool (``ident``:
        this group's :meth:`identity`, if the caller has it)."""
        ident = self.identity() if ident is None else ident
        return BlockKey(hashlib.sha256(b"pagedkv store key" + ident.tag + key.digest).digest(), key.token_ids)

    def encode(self, ident: _Identity, block: int, key: BlockKey) -> tuple[BlockKey, bytes]:
        """``(store key, value)`` of block ``block``, read from the pool now."""
        stored = self.store_key(key, ident)
        return stored, encode_pool_block(self.tiers.pool, block, stored, ident.fp, self.tiers.checksum)

    def _on_event(self, e: object) -> None:
        """Write-back: remember cached keys; read a block's value as it leaves the pool (called
        under the pool's lock, before anyone can write the block again)."""
        if getattr(e, "namespace", None) != self.namespace:
            return
        self._forget_loaded(e)
        if isinstance(e, BlockStored) and self.loaded.get(e.block_hash) != e.block_id:
            self.known[e.block_hash] = BlockKey(e.block_hash, e.token_ids)
        elif isinstance(e, BlockRemoved) and e.block_hash in self.known:
            key = self.known.pop(e.block_hash)
            self.tiers.evicted.append(self.encode(self.identity(), e.block_id, key))

    def _forget_loaded(self, e: object) -> None:
        """A block that came from a store left the pool's prefix cache: if it is computed again,
        it is written to the stores like any other."""
        if isinstance(e, BlockRemoved) and self.loaded.get(e.block_hash) == e.block_id:
            del self.loaded[e.block_hash]
        elif isinstance(e, AllBlocksCleared):
            self.loaded.clear()

    def did_load(self, digest: bytes, block: int) -> None:
        """Block ``block`` now holds ``digest``'s K/V, from a store: not to be written back."""
        self.loaded[digest] = block
        self.known.pop(digest, None)  # write-back heard of it as it entered the prefix cache

    def write_back_all(self) -> None:
        """Write-back: queue every block the pool still caches for this group."""
        ident = self.identity()
        for key, block in self.manager.block_pool.cached_keys(self.namespace).items():
            if isinstance(key, BlockKey) and key.digest in self.known:
                del self.known[key.digest]
                self.tiers.evicted.append(self.encode(ident, block, key))

    def cached_since(self) -> list[tuple[BlockKey, bytes]]:
        """Write-through: the values of the blocks this group cached since the last call."""
        items, ident = [], None
        for e in self.log.take():
            if getattr(e, "namespace", None) != self.namespace:
                continue
            self._forget_loaded(e)
            if not isinstance(e, BlockStored) or self.loaded.get(e.block_hash) == e.block_id:
                continue
            key = BlockKey(e.block_hash, e.token_ids)
            if self.manager.block_pool.lookup(self.namespace, key) != e.block_id:
                continue  # evicted or re-cached since: its contents may be another block's now
            ident = self.identity() if ident is None else ident  # once a flush (fp8 scales may change between)
            items.append(self.encode(ident, e.block_id, key))
        return items

    def fetch(self, store: BlockStore, keys: Sequence[BlockKey], ident: _Identity) -> list[StoredBlock]:
        """The longest run of ``keys``' blocks, from the first, that ``store`` serves whole for this
        group (``ident``: its :meth:`identity`)."""
        wanted = [self.store_key(k, ident) for k in keys]
        n = self.tiers.ask(store, "look blocks up", lambda: store.longest_prefix(wanted), 0)
        n = n if type(n) is int and 0 <= n <= len(wanted) else 0
        values = self.tiers.ask(store, "read blocks", lambda: store.get(wanted[:n]), [])
        if not isinstance(values, Sequence) or len(values) != n:  # a store of the user's own that answers wrong
            values = [None] * n
        verify, valid = not _trusted(store), []
        for k, v in zip(wanted[:n], values, strict=True):
            stored = decode_block(self.tiers.pool, k, v, ident.fp, verify=verify)
            if stored is None:  # not whole, not this key's, another pool's or group's: a miss from here on
                if v is not None:
                    self.tiers.rejected(store)
                break
            valid.append(stored)
        return valid


class Tiers:
    """The stores behind a cache's prefix cache (one manager per layer group), over a pool on the
    host or a GPU (whose blocks come over to the host, a run per layer and K or V, to be stored,
    and go back when loaded)."""

    def __init__(self, pool: KVPool, managers: BlockManager | Sequence[BlockManager], stores: Sequence[BlockStore],
                 *, model_id: str, write_back: bool = False, layers: Sequence[Sequence[int]] | None = None) -> None:
        managers = [managers] if isinstance(managers, BlockManager) else list(managers)
        self.pool, self.stores, self.write_back = pool, list(stores), write_back
        self.model_id = model_id  #: whose weights computed the K/V: part of every value's fingerprint and key
        #: values carry a checksum unless every store is trusted (keeps them in this process's memory)
        self.checksum = not all(_trusted(s) for s in self.stores)
        self.evicted: list[tuple[BlockKey, bytes]] = []  # write-back: values read as they left the pool
        self.tokens = {"pool": 0, **{s.name: 0 for s in self.stores}}  # prompt tokens served per tier
        self.failures = {s.name: {"failed": 0, "rejected": 0} for s in self.stores}  # see ask and rejected
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
        to every store; returns how many. A store that fails warns (see :meth:`ask`)."""
        items, self.evicted = self.evicted, []
        for g in self.groups:
            items += g.cached_since()
        for store in self.stores:
            self.ask(store, "write blocks", partial(store.put, items), None)
        return len(items)

    def ask(self, store: BlockStore, what: str, call: Callable[[], Any], miss: Any) -> Any:
        """``call()``, a request to ``store``; if it raises (a directory deleted under it, a store of
        the user's own that breaks), a RuntimeWarning and ``miss``: a store's failure never
        reaches the pool, the sequences or the caller's step."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001  (any store's failure is a miss, by contract)
            self.failures[store.name]["failed"] += 1
            warnings.warn(f"pagedkv: the {store.name} store failed to {what} ({type(e).__name__}: {e}); "
                          "treated as a miss, nothing in the pool changed", RuntimeWarning, stacklevel=2)
            return miss

    def rejected(self, store: BlockStore) -> None:
        """``store`` handed back a value that is not this pool's block: counted, and warned once."""
        counts = self.failures[store.name]
        counts["rejected"] += 1
        if counts["rejected"] == 1:
            warnings.warn(f"pagedkv: the {store.name} store handed back a value that is not this pool's block "
                          "(damaged, cut short or too long, another model's, format's or geometry's); treated as "
                          "a miss (said once per store, counted in stats()['tiers'])", RuntimeWarning, stacklevel=2)

    def load(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: object) -> int:
        """After ``seq_id`` took its pool prefix (the same length in every group): load the next
        full blocks of its prompt found in the stores; returns the tokens loaded."""
        bs = self.manager.block_size
        have = self.manager.context_len(seq_id)
        self.tokens["pool"] += have
        keys = self.manager.prompt_keys(token_ids, cache_salt)  # never the last token's block: the model computes it
        loaded, idents = 0, [g.identity() for g in self.groups]
        for store in self.stores:
            start = have // bs
            runs = [g.fetch(store, keys[start:], ident) for g, ident in zip(self.groups, idents, strict=True)]
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
                        g.did_load(keys[start + j].digest, int(table[start + j]))
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
        """Prompt tokens served by each tier, and each store's own counts with two of the tiers':
        ``failed`` (calls that raised, see :meth:`ask`) and ``rejected`` (values handed back
        that were not this pool's blocks)."""
        return {"tokens": dict(self.tokens),
                **{s.name: {**self.ask(s, "say its counts", s.stats, {}), **self.failures[s.name]}
                   for s in self.stores}}
