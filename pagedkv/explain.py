"""Why a prompt's K/V would, or would not, come from the cache: :func:`explain_prefix`.

A prefix cache that hits 0% says nothing about why. This module answers block by block, for
a prompt a :class:`~pagedkv.PagedKVCache` has not seen yet or has: where each block's K/V
would come from (the pool's prefix cache, or a store behind it, by tier), or why not:

- ``"last"``: the block of the prompt's last token, never taken from a cache (the model
  computes that token, whose logits pick the next one); when partial, how many tokens short
  of a full block it is;
- ``"evicted"``: the pool held it, and it left (when, and whether the stores were given it);
- ``"other_salt"``: the pool holds these tokens under another ``cache_salt`` (only where the
  caller may know: a server never tells one tenant of another's prompts);
- ``"other_format"``: a store holds these tokens for this model in another storage format or
  layout (or fp8 scales): a pool of another format wrote them, and their bytes do not fit this
  pool (another model's blocks cannot be found: its weights are in their keys);
- ``"outside_window"``: before the sliding window of the prompt's end, so never needed;
- ``"never_seen"``: none of these (or prefix caching is off, said in the detail);
- ``"pool"`` or ``"store"`` blocks after the first miss are marked ``usable=False``: keys chain,
  but a prompt takes a cached run from its start only.

Reading changes nothing: no block's recency, no hit or miss count, no store's counts (stores
are asked whether they hold a key, never for its value). ``num_cached_tokens`` is what
:meth:`~pagedkv.PagedKVCache.add_sequence` would find now (a store's value may still turn out
damaged when loaded).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from .blocks.events import AllBlocksCleared, BlockRemoved
from .blocks.manager import BlockManager, common_hit
from .blocks.prefix_key import BlockKey
from .offload.tiers import Tiers

#: the sources and reasons a block can have (see the module docstring)
SOURCES = ("pool", "store", "last", "evicted", "other_salt", "other_format", "outside_window", "never_seen")


@dataclass(frozen=True)
class BlockExplanation:
    """One block of a prompt: where its K/V would come from, or why not.

    Attributes:
        index: the block's number in the prompt.
        first_token, num_tokens: the prompt tokens it holds.
        source: one of :data:`SOURCES`.
        detail: the same in words, with what is known (block id, tier, when evicted...).
        usable: whether the prompt would take it (a cached run from the start).
        block_id: the pool block holding it (``"pool"``).
        tier: the store holding it (``"store"``).
        evicted_at: when it left the pool, ``time.time()`` seconds (``"evicted"``).
        given_to_stores: whether the stores were given it before it left (``"evicted"``).
    """

    index: int
    first_token: int
    num_tokens: int
    source: str
    detail: str
    usable: bool = False
    block_id: int | None = None
    tier: str | None = None
    evicted_at: float | None = None
    given_to_stores: bool | None = None


@dataclass(frozen=True)
class PrefixExplanation:
    """A prompt's blocks, explained (:func:`explain_prefix`).

    Attributes:
        blocks: one per block of the prompt, in order.
        num_cached_tokens: prompt tokens that would come from the pool or a store.
        num_prompt_tokens: the prompt's length.
        block_size: tokens per block.
    """

    blocks: tuple[BlockExplanation, ...]
    num_cached_tokens: int
    num_prompt_tokens: int
    block_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.num_cached_tokens} of {self.num_prompt_tokens} prompt tokens cached "
                 f"(blocks of {self.block_size})"]
        for b in self.blocks:
            span = f"{b.first_token}-{b.first_token + b.num_tokens - 1}"
            lines.append(f"  block {b.index:>3}  tokens {span:<11} {b.source:<14} {b.detail}")
        return "\n".join(lines)


class EvictionLog:
    """A bounded memory of the blocks that left a pool's prefix cache (a subscriber of its
    :class:`~pagedkv.BlockPool`): ``(namespace, digest) -> time``, the newest ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.removed: OrderedDict[tuple[int, bytes], float] = OrderedDict()
        self.cleared: dict[int, float] = {}  # namespace -> when its whole prefix cache was reset

    def __call__(self, event: object) -> None:
        if isinstance(event, BlockRemoved):
            entry = (event.namespace, event.block_hash)
            self.removed[entry] = time.time()
            self.removed.move_to_end(entry)
            while len(self.removed) > self.capacity:
                self.removed.popitem(last=False)
        elif isinstance(event, AllBlocksCleared):
            self.cleared[event.namespace] = time.time()


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.1f} s ago"


def explain_prefix(managers: Sequence[BlockManager], tiers: Tiers | None, evictions: EvictionLog,
                   token_ids: Sequence[int], cache_salt: Hashable = None, *,
                   other_salts: Sequence[Hashable] = ()) -> PrefixExplanation:
    """Explain ``token_ids``' blocks over the managers of one pool (one per layer group), the
    stores of ``tiers`` and the pool's ``evictions`` (see the module docstring).
    ``other_salts``: salts to try for a block seen under none of ``cache_salt``'s keys."""
    first = managers[0]
    bs = first.block_size
    keys = first.prompt_keys(token_ids, cache_salt)
    n = len(token_ids)
    with first.block_pool.lock:  # a consistent view: nothing moves while it is read
        pool_hit = common_hit(managers, keys)  # as add_sequence takes it
        skipped = min(m.prefix_cache.needed(pool_hit, m.sliding_window) for m in managers)
        held = [first.block_pool.lookup(first.prefix_cache.namespace, k) for k in keys]
        removed = {j: evictions.removed.get((first.prefix_cache.namespace, k.digest)) for j, k in enumerate(keys)}
        cleared = evictions.cleared.get(first.prefix_cache.namespace)
        salted: dict[int, bool] = {}
        for salt in other_salts:
            if salt == cache_salt:
                continue
            for j, k in enumerate(first.prompt_keys(token_ids, salt)):
                if held[j] is None and first.block_pool.lookup(first.prefix_cache.namespace, k) is not None:
                    salted[j] = True
    tier_of: dict[int, str] = {}
    stored_from = pool_hit
    if tiers is not None:  # what the stores hold next, in their order (presence only)
        for store in tiers.stores:
            rest: Sequence[BlockKey] = keys[stored_from:]
            if not rest:
                break
            runs = [tiers.ask(store, "look blocks up", partial(store.longest_prefix, [g.store_key(k) for k in rest]), 0)
                    for g in tiers.groups]
            good = min(runs)
            for j in range(stored_from, stored_from + good):
                tier_of[j] = store.name
            stored_from += good
    cached = stored_from
    foreign: dict[int, str] = {}  # block -> what a store holds it as, for this model in another format
    if tiers is not None and cached < len(keys) and held[cached] is None and removed[cached] is None:
        group = tiers.groups[0]
        for store in tiers.stores:
            for what, ident in group.other_identities():
                rest = [group.store_key(k, ident) for k in keys[cached:]]
                found = tiers.ask(store, "look blocks up", partial(store.longest_prefix, rest), 0)
                for j in range(cached, cached + found):
                    foreign.setdefault(j, f"the {store.name} store holds these tokens for this model as {what}: "
                                          "written by a pool of another format, unusable here")
                if found:
                    break
    blocks = []
    for j in range(len(keys)):
        start = j * bs
        usable = j < cached
        if j < pool_hit and j < skipped:
            blocks.append(BlockExplanation(j, start, bs, "outside_window", "before the sliding window of the "
                                           "prompt's end: never read, not needed", True))
        elif j < pool_hit or (not usable and held[j] is not None):
            where = f"in the pool, block {held[j]}" if held[j] is not None else "in the pool"
            blocks.append(BlockExplanation(j, start, bs, "pool", where if usable else
                                           f"{where}, but an earlier block misses: not taken", usable, held[j]))
        elif j in tier_of:
            blocks.append(BlockExplanation(j, start, bs, "store", f"in the {tier_of[j]} store", True,
                                           tier=tier_of[j]))
        elif (left := removed[j]) is not None:
            given = tiers is not None
            detail = f"left the pool {_ago(left)}" + (
                "; the stores were given it but no longer hold it" if given else "; no store behind the pool")
            blocks.append(BlockExplanation(j, start, bs, "evicted", detail, evicted_at=left, given_to_stores=given))
        elif j in foreign:
            blocks.append(BlockExplanation(j, start, bs, "other_format", foreign[j]))
        elif salted.get(j):
            blocks.append(BlockExplanation(j, start, bs, "other_salt", "the pool holds these tokens under another "
                                           "cache_salt: salts never share blocks"))
        else:
            detail = "never cached by this pool"
            if cleared is not None:
                detail += f" since its prefix cache was reset {_ago(cleared)}"
            blocks.append(BlockExplanation(j, start, bs, "never_seen", detail))
    if not first.prefix_cache.enabled and n:
        blocks = [BlockExplanation(j, j * bs, min(bs, n - j * bs), "never_seen", "prefix caching is off")
                  for j in range((n - 1) // bs)]
    last = len(blocks) * bs
    if last < n:  # the block of the last token
        count = n - last
        detail = (f"partial: {bs - count} tokens short of a full block, never cached" if count < bs else
                  "holds the prompt's last token, which the model computes (its logits pick the next one)")
        blocks.append(BlockExplanation(len(blocks), last, count, "last", detail))
    return PrefixExplanation(tuple(blocks), cached * bs, n, bs)
