"""One object for the decode loop: :class:`PagedKVCache`.

::

    cache = pagedkv.PagedKVCache(config, backend="numba")
    seq = cache.add_sequence(prompt_token_ids=prompt).seq_id
    step = cache.begin_step([seq], [len(prompt)], token_ids=[prompt])   # bookkeeping, once a step
    for layer in range(config.num_layers):
        cache.write(layer, k, v, step)                                   # this step's K/V
        out = cache.attention(layer, q, step)                            # attention over the cache
    cache.end_step(step)                                                 # its writes have landed

A model that mixes full and sliding-window layers declares ``layer_groups`` in its
:class:`~pagedkv.CacheConfig`: each group gets its own :class:`~pagedkv.BlockManager`
(block tables, prefix cache) over the one pool, a sliding group frees the blocks that
leave its window, and ``write`` / ``attention`` pick the layer's group (its plan, its
window) by themselves.

A step is open from ``begin_step`` to ``end_step`` (or the next ``begin_step``).
Meanwhile ``free`` and ``truncate`` hold the blocks they let go of until it ends,
so an asynchronous writer of the step never lands in a block given to another
sequence, and the step stays valid for every other sequence.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .backends import get_backend
from .blocks.block_pool import BlockPool
from .blocks.manager import BlockManager, SlidingWindowManager, common_hit
from .blocks.sequence import count
from .errors import ConfigError, InvariantError, OutOfBlocksError, StepError
from .explain import EvictionLog, PrefixExplanation, explain_prefix
from .geometry.config import CacheConfig
from .memory.pool import KVPool
from .offload.stores import BlockStore
from .offload.tiers import Tiers
from .ops.plan import Plan


class Added(NamedTuple):
    """What :meth:`PagedKVCache.add_sequence` returns."""

    seq_id: Hashable
    num_cached_tokens: int  # prompt tokens already in the cache: do not compute them again


class GroupStep(NamedTuple):
    """One layer group's part of a :class:`Step`: its slot mapping, block tables (-1 where a
    sliding group freed blocks), copy-on-write copies and plan."""

    slot_mapping: np.ndarray
    block_tables: np.ndarray
    copies: tuple[np.ndarray, np.ndarray]
    plan: Plan


@dataclass(frozen=True, eq=False)  # a step is equal only to itself (it holds arrays)
class Step:
    """The bookkeeping of one step, made once and used by every layer.

    With layer groups, ``slot_mapping``, ``block_tables``, ``copies`` and ``plan`` are the
    first group's, and ``groups`` holds every group's (``write`` and ``attention`` pick).

    Attributes:
        seq_ids: the sequences of the step, in row order.
        num_new_tokens: int32 ``[B]``, tokens each sequence adds (rows of ``k``/``v``/``q``).
        slot_mapping: int64 ``[sum(num_new_tokens)]``, where the new tokens' K/V go.
        block_tables: int32 ``[B, max_blocks]``; context_lens: int32 ``[B]`` (new tokens included).
        is_decode: every sequence adds exactly one token.
        copies: the ``(src, dst)`` copy-on-write copies applied before this step's writes.
        plan: the backend's :class:`~pagedkv.ops.plan.Plan` of the step: its index arrays
            validated once (and, on a GPU, uploaded once) for every layer.
        groups: a :class:`GroupStep` per layer group.
        cache, epoch: the cache that made the step and its epoch then; the step is
            valid until that cache's next ``begin_step``, ``fork``, ``truncate``,
            ``free`` or ``reset`` (any of which may hand its blocks to others).
    """

    seq_ids: tuple
    num_new_tokens: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    is_decode: bool
    copies: tuple[np.ndarray, np.ndarray]
    plan: Plan
    cache: PagedKVCache = field(repr=False)
    epoch: int = 0
    groups: tuple[GroupStep, ...] = ()

    @property
    def positions(self) -> np.ndarray:
        """int64 position of every new token in its sequence (for rotary embeddings)."""
        assert self.plan.attention is not None  # a step always plans attention
        return self.plan.attention.row_pos


class PagedKVCache:
    """A paged KV cache with its pool, block manager (prefix cache included) and backend.

    Args:
        config: the geometry.
        backend: ``"numpy"``, ``"numba"``, ``"cuda"`` or ``"auto"`` (the fastest CPU
            backend, see :func:`pagedkv.resolve_backend`).
        enable_prefix_caching: reuse the K/V of prompt prefixes seen before.
        stores: slower tiers behind the prefix cache (:mod:`pagedkv.offload.stores`: host memory,
            a directory, Redis), in lookup order: full prompt blocks are written through
            to them when their step ends, and a new prompt's next blocks are loaded from
            them after the pool's own hits (:mod:`pagedkv.offload.tiers`; a pool on the host or a GPU).
        write_back: write a block to the stores only when it leaves the pool (evicted, or at
            ``reset`` / ``close``) instead of as soon as it is cached.
        model_id: required with ``stores``: a name of the weights whose K/V the cache holds (a
            model's path and revision, a hash of its weights:
            :func:`pagedkv.integrations.transformers.model_id` makes one for a transformers
            model). Two models of one geometry (a base model and its fine-tune) sharing a store
            then never see each other's blocks: it is part of every stored block's key and header.

    Raises ConfigError for a bad argument, before anything is made.
    """

    def __init__(self, config: CacheConfig, backend: str = "auto", *, enable_prefix_caching: bool = True,
                 stores: Sequence[BlockStore] = (), write_back: bool = False, model_id: str | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"PagedKVCache needs a CacheConfig, got {type(config).__name__}")
        stores = tuple(stores)
        if stores:
            if not enable_prefix_caching:
                raise ConfigError("stores back the prefix cache: enable_prefix_caching must be on")
            if not isinstance(model_id, str) or not model_id.strip():
                raise ConfigError("stores need a model_id (a non-empty str naming the model's weights, e.g. its path "
                                  "and revision): stores may be shared, and blocks of another model of the same "
                                  f"geometry must never be served; got {model_id!r}")
            names = [getattr(st, "name", None) for st in stores]
            if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"each store needs a name of its own (str), to count its hits by; got {names}")
        elif model_id is not None and not isinstance(model_id, str):
            raise ConfigError(f"model_id must be a str, got {model_id!r}")
        self.config = config
        self.backend = get_backend(backend)
        self.pool = KVPool(config, device=self.backend.DEVICE)
        shared = BlockPool(config.num_blocks)
        #: a BlockManager per layer group, over one BlockPool (``manager``: the first)
        self.managers = tuple(
            SlidingWindowManager(config.block_size, shared, enable_prefix_caching=enable_prefix_caching,
                                 sliding_window=g.sliding_window, group=i)
            if g.sliding_window is not None else
            BlockManager(config.block_size, shared, enable_prefix_caching=enable_prefix_caching, group=i)
            for i, g in enumerate(config.layer_groups))
        self.manager = self.managers[0]
        self._evictions = EvictionLog(capacity=4 * config.num_blocks)  # for explain_prefix
        shared.subscribe(self._evictions)
        self._salts: dict[Hashable, None] = {}  # the newest salts of add_sequence, for explain_prefix
        self._planes = tuple(config.plane_of(layer) for layer in range(config.num_layers))
        self._epoch = 0  # moves on whenever blocks may change hands: older steps are stale
        self._open: Step | None = None  # the step between begin_step and end_step
        self.tiers: Tiers | None = None
        if stores:
            self.tiers = Tiers(self.pool, self.managers, stores, model_id=str(model_id), write_back=write_back,
                               layers=[g.layers for g in config.layer_groups])

    def __repr__(self) -> str:
        return f"PagedKVCache(backend={self.backend.NAME!r}, {self.pool!r})"

    # -- sequences ---------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable = None, *, prompt_token_ids: Sequence[int] | None = None,
                     cache_salt: Hashable = None, max_cached_tokens: int | None = None) -> Added:
        """Start a sequence; with a prompt, say how many of its tokens the prefix cache (and the
        stores behind it) hold: the model computes the rest. ``max_cached_tokens`` caps what is
        taken from the pool's prefix cache (whole blocks; the stores are then not asked), so that
        several prompts can start at one length."""
        limit = None
        if max_cached_tokens is not None:
            limit = count(max_cached_tokens, "max_cached_tokens") // self.config.block_size
        if prompt_token_ids is not None:
            self._remember_salt(cache_salt)
        if len(self.managers) > 1:
            seq_id = self._add_grouped(seq_id, prompt_token_ids, cache_salt, limit)
        else:
            seq_id = self.manager.add_sequence(seq_id, prompt_token_ids=prompt_token_ids, cache_salt=cache_salt,
                                               max_cached_blocks=limit)
        if self.tiers is not None and prompt_token_ids is not None and limit is None:
            try:
                self.tiers.load(seq_id, prompt_token_ids, cache_salt)
            except BaseException:  # all or nothing: the caller never got the id, so nothing may keep it
                for m in self.managers:
                    if seq_id in m.seq_ids:
                        m.free(seq_id)
                self._moved_unless_open()
                raise
        return Added(seq_id, self.manager.context_len(seq_id))

    def _remember_salt(self, salt: Hashable) -> None:
        try:
            self._salts.pop(salt, None)
        except TypeError:  # not hashable: add_sequence says so
            return
        self._salts[salt] = None
        if len(self._salts) > 64:
            del self._salts[next(iter(self._salts))]

    def explain_prefix(self, prompt_token_ids: Sequence[int], cache_salt: Hashable = None, *,
                       reveal_other_salts: bool = True) -> PrefixExplanation:
        """Where each block of a prompt's K/V would come from now (the pool, a store), or why
        not (the last token's block, evicted and when, another salt, outside a sliding window,
        never seen): :mod:`pagedkv.explain`. Changes nothing: no recency, counts or store
        reads. ``reveal_other_salts=False`` never says that another tenant's salt holds the
        tokens (a server's answer to one tenant)."""
        others = list(self._salts) if reveal_other_salts else []
        return explain_prefix(self.managers, self.tiers, self._evictions, prompt_token_ids, cache_salt,
                              other_salts=others)

    def _add_grouped(self, seq_id: Hashable, prompt: Sequence[int] | None, salt: Hashable,
                     limit: int | None) -> Hashable:
        """Add to every group's manager, with one prefix hit: the longest that every group can
        serve (full groups need every block, sliding ones those in the window: each group's
        longest hit up to the others', until they agree)."""
        with self.manager.block_pool.lock:
            if prompt is not None:
                keys = self.manager.prompt_keys(prompt, salt)  # hashed once: the same in every group
                limit = common_hit(self.managers, keys, limit)
            seq_id = self.manager.add_sequence(seq_id, prompt_token_ids=prompt, cache_salt=salt,
                                               max_cached_blocks=limit)
            for m in self.managers[1:]:
                m.add_sequence(seq_id, prompt_token_ids=prompt, cache_salt=salt, max_cached_blocks=limit)
            return seq_id

    def fork(self, seq_id: Hashable, child_id: Hashable = None) -> Hashable:
        """A new sequence sharing ``seq_id``'s tokens (copy-on-write); returns its id."""
        result = self.manager.fork(seq_id, child_id)
        for m in self.managers[1:]:
            m.fork(seq_id, result)
        self._epoch += 1  # blocks may have changed hands: older steps are stale
        return result

    def truncate(self, seq_id: Hashable, new_len: int) -> int:
        """Keep the first ``new_len`` tokens (reject speculative ones); returns blocks freed
        (0 while a step is open: they go back at :meth:`end_step`)."""
        for m in self.managers[1:]:  # a sliding group may refuse: check all before any moves
            m.check_truncate(seq_id, new_len)
        result = sum(m.truncate(seq_id, new_len) for m in self.managers)
        self._moved_unless_open()
        return result

    def free(self, seq_id: Hashable) -> int:
        """End a sequence; returns blocks given back to the pool (0 while a step is open: they
        go back at :meth:`end_step`, and the open step stays valid for the other sequences)."""
        result = sum(m.free(seq_id) for m in self.managers)
        self._moved_unless_open()
        return result

    def _moved_unless_open(self) -> None:
        # With a step open, released blocks are held until it ends: no one can get them, so
        # the step stays valid; without one, they may change hands, and older steps are stale.
        if self._open is None:
            self._epoch += 1

    def reset(self) -> None:
        """Free every sequence and forget the prefix cache (the pool's contents stay; with
        write-back stores, its cached blocks are written to them first)."""
        self.end_step()
        if self.tiers is not None and self.tiers.write_back:
            self.tiers.write_back_all()
        for m in self.managers:
            m.reset()
        self._epoch += 1

    def close(self) -> None:
        """Give every block back (see :meth:`BlockManager.close`); ``with`` closes on the way out."""
        self.reset()

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def can_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> bool:
        """Whether :meth:`begin_step` would find enough blocks now (for every layer group)."""
        with self.manager.block_pool.lock:
            return self.manager.block_pool.can_allocate(sum(m.blocks_needed(seq_ids, num_new_tokens)
                                                            for m in self.managers))

    def stats(self) -> dict[str, Any]:
        """The block manager's counts (blocks used, cached, prefix hits...), and with stores,
        ``tiers``: prompt tokens served by each tier and each store's counts."""
        stats: dict[str, Any] = dict(self.manager.stats())
        if len(self.managers) > 1:
            stats["blocks_per_group"] = [m.blocks_held() for m in self.managers]
        if self.tiers is not None:
            stats["tiers"] = self.tiers.stats()
        return stats

    # -- a step ------------------------------------------------------------------------------

    def begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
                   token_ids: Sequence[Sequence[int] | None] | None = None) -> Step:
        """Make room for this step's new tokens and apply copy-on-write; once a step, before any layer.

        Ends the step still open, if any (see :meth:`end_step`). Raises OutOfBlocksError
        (changing nothing) when the pool cannot hold them.
        """
        self.end_step()
        seq_ids = tuple(seq_ids)
        with self.manager.block_pool.lock:
            if len(self.managers) > 1:  # all groups or none: count every group's blocks first
                needed = sum(m.blocks_needed(seq_ids, num_new_tokens) for m in self.managers)
                if not self.manager.block_pool.can_allocate(needed):
                    raise OutOfBlocksError(f"this step needs {needed} blocks over its {len(self.managers)} "
                                           f"layer groups; the pool has {self.manager.block_pool.num_free} free")
            appended = [m.append_batch(seq_ids, num_new_tokens, token_ids) for m in self.managers]  # checks all
        self._epoch += 1
        counts = np.array([int(n) for n in num_new_tokens], dtype=np.int32)
        decode = bool((counts == 1).all())  # one query a sequence: the plan needs no query lengths
        groups = []
        lens = self.manager.context_lens(seq_ids)  # the same in every group
        for m, group, a in zip(self.managers, self.config.layer_groups, appended, strict=True):
            if a.copy_src.size:
                self.backend.copy_blocks(self.pool, a.copy_src, a.copy_dst)
                m.release_copy_sources()
            tables = m.block_tables(seq_ids)
            plan = self.backend.plan(self.pool, slot_mapping=a.slots, block_tables=tables, context_lens=lens,
                                     query_lens=None if decode else counts, sliding_window=group.sliding_window)
            groups.append(GroupStep(a.slots, tables, (a.copy_src, a.copy_dst), plan))
        first = groups[0]
        step = Step(seq_ids, counts, first.slot_mapping, first.block_tables, lens, decode,
                    first.copies, first.plan, self, self._epoch, tuple(groups))
        for m in self.managers:
            m.step_started()
        self._open = step
        return step

    def end_step(self, step: Step | None = None) -> int:
        """The open step's writes have landed (after a GPU synchronize, say): give back the
        blocks that ``free`` and ``truncate`` held during it; returns how many went back.
        ``step``, if given, must be the open one (StepError otherwise); no step open: 0."""
        if step is not None and step is not self._open:
            raise StepError("this step is not the open one (it ended, or another cache made it)")
        if self._open is None:
            return 0
        self._open = None
        try:
            if self.tiers is not None:  # the step's K/V are written: its newly cached blocks go to the stores
                self.tiers.flush()      # (before the held blocks go back: none can be taken meanwhile)
        finally:  # whatever happened there, the step is over: its held blocks go back
            released = sum(m.step_finished() for m in self.managers)
        return released

    def check(self) -> None:
        """Verify every invariant of every layer group's manager (see :meth:`BlockManager.check`),
        and that blocks are held for a step only while one is open: raise
        :class:`~pagedkv.InvariantError` at the first broken one."""
        for m in self.managers:
            m.check()
            if m.step_in_flight and self._open is None:
                raise InvariantError("a manager holds freed blocks for a step, but no step is open: they would "
                                     "never go back to the pool")

    def write(self, layer: int, key: Any, value: Any, step: Step) -> None:
        """Store this step's new keys and values (``[sum(new tokens), H, D]``) for ``layer``.

        Only ``layer`` and the arrays' dtype and shape are checked here: the
        step's index arrays were checked once, in :meth:`begin_step`.

        Raises:
            StepError: ``step`` is stale (see :class:`Step`) or another cache's.
        """
        group, plane = self._plane(layer)
        self.backend.write_step(self.pool, plane, key, value, self._current(step).groups[group].plan)

    def attention(self, layer: int, q: Any, step: Step, **options: Any) -> Any:
        """Attention of this step's queries (``[sum(new tokens), Hq, D]``) over the cache.

        Each new token attends causally to its sequence's cache (its own K/V
        written first). ``options``: ``scale``, ``sliding_window``, ``soft_cap``; the layer's
        group's window is the default (a smaller one may be given, a larger one not).
        """
        group, plane = self._plane(layer)
        window = self.config.layer_groups[group].sliding_window
        if window is not None:
            options.setdefault("sliding_window", window)
        return self.backend.attention_step(q, self.pool, plane, self._current(step).groups[group].plan, **options)

    def _plane(self, layer: object) -> tuple[int, int]:
        """``(group, plane)`` of a model layer (a LayerIndexError for a bad one); O(1)."""
        if type(layer) is int and 0 <= layer < len(self._planes):
            return self._planes[layer]
        return self.config.plane_of(layer)

    def _current(self, step: object) -> Step:
        """``step`` if it is this cache's latest and nothing has moved blocks since, else a StepError:
        a stale step's slots may lie in blocks that now hold another sequence's tokens."""
        if not isinstance(step, Step) or step.cache is not self:
            raise StepError("this step was not made by this cache's begin_step")
        if step.epoch != self._epoch:
            raise StepError("this step is stale: a later begin_step, fork, truncate, free or reset "
                            "may have given its blocks to other sequences")
        return step


#: what :func:`warmup` compiles by default: every routine a cache or a user calls
ROUTINES = ("write", "attention", "copy_blocks", "gather", "read")


def warmup(dtypes: Sequence[str] = ("float32",), *, backend: str = "auto", layouts: Sequence[str] = ("NHD",),
           routines: Sequence[str] = ROUTINES) -> float:
    """Compile (or load from numba's disk cache) the kernels a :class:`PagedKVCache` of these
    storage formats and layouts runs: writes, decode and prefill attention (with and without a
    sliding window), block copies, and gathers and reads (``routines`` picks among
    :data:`ROUTINES`), on a pool of a few blocks. Returns the seconds it took. ``pagedkv
    warmup`` runs it (a container image built with it starts at once); the engine (its own
    routines only) and the demo run it before their clocks start."""
    unknown = set(routines) - set(ROUTINES)
    if unknown:
        raise ConfigError(f"warmup routines must be among {ROUTINES}, got {sorted(unknown)}")
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        for layout in layouts:
            done = (get_backend(backend).NAME, str(dtype), layout, tuple(sorted(routines)))
            if any(w[:3] == done[:3] and set(routines) <= set(w[3]) for w in _WARM):  # these, or more, warmed
                continue
            config = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=8, block_size=4, dtype=dtype,
                                 layout=layout)
            cache = PagedKVCache(config, backend, enable_prefix_caching=False)
            seqs = [cache.add_sequence().seq_id for _ in range(2)]
            for counts in ([9, 6], [1, 1]):  # a prefill step (tiled attention), then a decode step
                step = cache.begin_step(seqs, counts)
                n = sum(counts)
                k, v = (rng.standard_normal((n, 2, 8), dtype=np.float32) for _ in range(2))
                cache.write(0, k, v, step)
                if "attention" in routines:
                    q = rng.standard_normal((n, 4, 8), dtype=np.float32)
                    cache.attention(0, q, step)
                    cache.attention(0, q, step, sliding_window=3, soft_cap=30.0)
                cache.end_step(step)
            tables = np.array([[0, 1, 2], [3, 4, -1]], np.int32)
            if "gather" in routines:
                cache.backend.gather(cache.pool, 0, tables, np.array([10, 7], np.int32))
            if "read" in routines:
                cache.backend.read(cache.pool, 0, np.arange(6, dtype=np.int64))
            if "copy_blocks" in routines:
                cache.backend.copy_blocks(cache.pool, np.array([0], np.int64), np.array([5], np.int64))
            cache.close()
            _WARM.add(done)
    return time.perf_counter() - start


_WARM: set[tuple[str, str, str, tuple[str, ...]]] = set()  # (backend, format, layout, routines) warmed here
