"""One object for the decode loop: :class:`PagedKVCache`.

::

    cache = pagedkv.PagedKVCache(config, backend="numba")
    seq = cache.add_sequence(prompt_token_ids=prompt).seq_id
    step = cache.begin_step([seq], [len(prompt)], token_ids=[prompt])   # bookkeeping, once a step
    for layer in range(config.num_layers):
        cache.write(layer, k, v, step)                                   # this step's K/V
        out = cache.attention(layer, q, step)                            # attention over the cache
    cache.end_step(step)                                                 # its writes have landed

A step is open from ``begin_step`` to ``end_step`` (or the next ``begin_step``).
Meanwhile ``free`` and ``truncate`` hold the blocks they let go of until it ends,
so an asynchronous writer of the step never lands in a block given to another
sequence, and the step stays valid for every other sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .backends import get_backend
from .config import CacheConfig
from .errors import ConfigError, StepError
from .manager import BlockManager
from .plan import Plan
from .pool import KVPool
from .stores import BlockStore
from .tiers import Tiers


class Added(NamedTuple):
    """What :meth:`PagedKVCache.add_sequence` returns."""

    seq_id: Hashable
    num_cached_tokens: int  # prompt tokens already in the cache: do not compute them again


@dataclass(frozen=True, eq=False)  # a step is equal only to itself (it holds arrays)
class Step:
    """The bookkeeping of one step, made once and used by every layer.

    Attributes:
        seq_ids: the sequences of the step, in row order.
        num_new_tokens: int32 ``[B]``, tokens each sequence adds (rows of ``k``/``v``/``q``).
        slot_mapping: int64 ``[sum(num_new_tokens)]``, where the new tokens' K/V go.
        block_tables: int32 ``[B, max_blocks]``; context_lens: int32 ``[B]`` (new tokens included).
        is_decode: every sequence adds exactly one token.
        copies: the ``(src, dst)`` copy-on-write copies applied before this step's writes.
        plan: the backend's :class:`~pagedkv.plan.Plan` of the step: its index arrays
            validated once (and, on a GPU, uploaded once) for every layer.
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
        stores: slower tiers behind the prefix cache (:mod:`pagedkv.stores`: host memory,
            a directory, Redis), in lookup order: full prompt blocks are written through
            to them when their step ends, and a new prompt's next blocks are loaded from
            them after the pool's own hits (:mod:`pagedkv.tiers`; a CPU pool).
        write_back: write a block to the stores only when it leaves the pool (evicted, or at
            ``reset`` / ``close``) instead of as soon as it is cached.
    """

    def __init__(self, config: CacheConfig, backend: str = "auto", *, enable_prefix_caching: bool = True,
                 stores: Sequence[BlockStore] = (), write_back: bool = False) -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"PagedKVCache needs a CacheConfig, got {type(config).__name__}")
        self.config = config
        self.backend = get_backend(backend)
        self.pool = KVPool(config, device=self.backend.DEVICE)
        self.manager = BlockManager(config.block_size, num_blocks=config.num_blocks,
                                    enable_prefix_caching=enable_prefix_caching)
        self._epoch = 0  # moves on whenever blocks may change hands: older steps are stale
        self._open: Step | None = None  # the step between begin_step and end_step
        self.tiers: Tiers | None = None
        if stores:
            if self.pool.device != "cpu":
                raise ConfigError("stores work with a CPU pool for now")
            if not enable_prefix_caching:
                raise ConfigError("stores back the prefix cache: enable_prefix_caching must be on")
            self.tiers = Tiers(self.pool, self.manager, stores, write_back=write_back)

    def __repr__(self) -> str:
        return f"PagedKVCache(backend={self.backend.NAME!r}, {self.pool!r})"

    # -- sequences ---------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable = None, *, prompt_token_ids: Sequence[int] | None = None,
                     cache_salt: Hashable = None) -> Added:
        """Start a sequence; with a prompt, say how many of its tokens the prefix cache (and the
        stores behind it) hold: the model computes the rest."""
        seq_id = self.manager.add_sequence(seq_id, prompt_token_ids=prompt_token_ids, cache_salt=cache_salt)
        if self.tiers is not None and prompt_token_ids is not None:
            self.tiers.load(seq_id, prompt_token_ids, cache_salt)
        return Added(seq_id, self.manager.context_len(seq_id))

    def fork(self, seq_id: Hashable, child_id: Hashable = None) -> Hashable:
        """A new sequence sharing ``seq_id``'s tokens (copy-on-write); returns its id."""
        result = self.manager.fork(seq_id, child_id)
        self._epoch += 1  # blocks may have changed hands: older steps are stale
        return result

    def truncate(self, seq_id: Hashable, new_len: int) -> int:
        """Keep the first ``new_len`` tokens (reject speculative ones); returns blocks freed
        (0 while a step is open: they go back at :meth:`end_step`)."""
        result = self.manager.truncate(seq_id, new_len)
        self._moved_unless_open()
        return result

    def free(self, seq_id: Hashable) -> int:
        """End a sequence; returns blocks given back to the pool (0 while a step is open: they
        go back at :meth:`end_step`, and the open step stays valid for the other sequences)."""
        result = self.manager.free(seq_id)
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
        self.manager.reset()
        self._epoch += 1

    def close(self) -> None:
        """Give every block back (see :meth:`BlockManager.close`); ``with`` closes on the way out."""
        self.reset()

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def can_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> bool:
        """Whether :meth:`begin_step` would find enough blocks now."""
        return self.manager.can_append(seq_ids, num_new_tokens)

    def stats(self) -> dict[str, Any]:
        """The block manager's counts (blocks used, cached, prefix hits...), and with stores,
        ``tiers``: prompt tokens served by each tier and each store's counts."""
        stats: dict[str, Any] = dict(self.manager.stats())
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
        appended = self.manager.append_batch(seq_ids, num_new_tokens, token_ids)  # checks every argument
        self._epoch += 1
        counts = np.array([int(n) for n in num_new_tokens], dtype=np.int32)
        if appended.copy_src.size:
            self.backend.copy_blocks(self.pool, appended.copy_src, appended.copy_dst)
            self.manager.release_copy_sources()
        tables, lens = self.manager.block_tables(seq_ids), self.manager.context_lens(seq_ids)
        plan = self.backend.plan(self.pool, slot_mapping=appended.slots, block_tables=tables,
                                 context_lens=lens, query_lens=counts)
        step = Step(seq_ids, counts, appended.slots, tables, lens, bool((counts == 1).all()),
                    (appended.copy_src, appended.copy_dst), plan, self, self._epoch)
        self.manager.step_started()
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
        if self.tiers is not None:  # the step's K/V are written: its newly cached blocks go to the stores
            self.tiers.flush()
        return self.manager.step_finished()

    def write(self, layer: int, key: Any, value: Any, step: Step) -> None:
        """Store this step's new keys and values (``[sum(new tokens), H, D]``) for ``layer``.

        Only ``layer`` and the arrays' dtype and shape are checked here: the
        step's index arrays were checked once, in :meth:`begin_step`.

        Raises:
            StepError: ``step`` is stale (see :class:`Step`) or another cache's.
        """
        self.backend.write_step(self.pool, layer, key, value, self._current(step).plan)

    def attention(self, layer: int, q: Any, step: Step, **options: Any) -> Any:
        """Attention of this step's queries (``[sum(new tokens), Hq, D]``) over the cache.

        Each new token attends causally to its sequence's cache (its own K/V
        written first). ``options``: ``scale``, ``sliding_window``, ``soft_cap``.
        """
        return self.backend.attention_step(q, self.pool, layer, self._current(step).plan, **options)

    def _current(self, step: object) -> Step:
        """``step`` if it is this cache's latest and nothing has moved blocks since, else a StepError:
        a stale step's slots may lie in blocks that now hold another sequence's tokens."""
        if not isinstance(step, Step) or step.cache is not self:
            raise StepError("this step was not made by this cache's begin_step")
        if step.epoch != self._epoch:
            raise StepError("this step is stale: a later begin_step, fork, truncate, free or reset "
                            "may have given its blocks to other sequences")
        return step
