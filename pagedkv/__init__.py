"""pagedkv: a paged (vLLM-style) KV cache for LLM inference.

The keys and values of every past token live in fixed-size blocks of one flat
pool (:class:`KVPool`, arithmetic in :mod:`pagedkv.geometry.layout`; float32 or one of the
16- and 8-bit formats of :mod:`pagedkv.geometry.formats`), so memory
is taken block by block as sequences grow and blocks can be shared between
sequences. The routines that move data in and out of the pool exist in several
backends that agree exactly with the numpy reference (:func:`get_backend`).

The package is layered; each layer imports only from the layers listed before it:

=================  ==========================================================================
``errors``         the exceptions (every layer may raise them)
``geometry``       the pool's arithmetic (``layout``), storage ``formats``, ``config``
``memory``         host and GPU arrays (``device``), the pool (:class:`KVPool`), other
                   engines' cache layouts (``conventions``)
``ops``            the front door of every routine: checks, plans, documentation, written once
``backends``       the kernels behind it: ``numpy`` (the reference), ``numba``, ``cuda``
``blocks``         the bookkeeping: block pool, prefix cache, sequences, :class:`BlockManager`
``offload``        blocks outside the pool: stored blocks, stores, tiers
``explain``        why a prompt's blocks would or would not come from the cache
``cache``          :class:`PagedKVCache`, the facade over all of the above
``integrations``   bridges to other libraries (transformers), each behind its own extra
``engine``         :class:`LLM`: many requests of a transformers model over one pool
``serve``          ``pagedkv serve``: an OpenAI-compatible HTTP server on the engine
``testing``        the conformance kit for other people's kernels and block managers
``tools``          the programs: the ``pagedkv`` command, the demo and its model, the bench
=================  ==========================================================================

Modules of earlier releases (``pagedkv.stores``, ``pagedkv.layout``, ...) stay importable at
their old paths (:mod:`pagedkv._old_paths`).
"""

from . import _old_paths
from ._version import __version__
from .backends import BACKENDS, Backend, available_backends, get_backend, resolve_backend
from .blocks.block_pool import BlockPool
from .blocks.events import AllBlocksCleared, BlockRemoved, BlockStored, EventIndex, EventLog, EventPublisher, Sequenced
from .blocks.manager import BlockManager, SlidingWindowManager
from .blocks.sequence import Appended
from .cache import Added, PagedKVCache, Step, warmup
from .errors import (
    AllocatorError,
    ArgumentError,
    BackendUnavailableError,
    BlockCopyError,
    BlockIndexError,
    ConfigError,
    ContextLengthError,
    ContiguityError,
    DTypeError,
    DuplicateSlotError,
    InvariantError,
    LayerIndexError,
    OutOfBlocksError,
    PagedKVError,
    PoolMismatchError,
    SequenceExistsError,
    ShapeError,
    SlotIndexError,
    StepError,
    UnknownSequenceError,
)
from .geometry import formats, layout
from .geometry.config import CacheConfig, LayerGroup
from .geometry.layout import Strides
from .memory.pool import KVPool
from .ops.plan import Plan

__all__ = [
    "AllBlocksCleared", "BlockRemoved", "BlockStored", "EventIndex", "EventLog", "EventPublisher", "Sequenced",
    "events",
    "BACKENDS", "Added", "AllocatorError", "Appended", "ArgumentError", "Backend", "BackendUnavailableError",
    "BlockCopyError", "BlockIndexError", "BlockManager", "BlockPool", "CacheConfig", "ConfigError",
    "ContextLengthError", "ContiguityError", "DTypeError", "DuplicateSlotError", "InvariantError", "KVPool",
    "LayerGroup", "LayerIndexError", "OutOfBlocksError", "PagedKVCache", "PagedKVError", "Plan", "PoolMismatchError",
    "SequenceExistsError", "ShapeError", "SlidingWindowManager",
    "SlotIndexError", "Step", "StepError", "Strides", "UnknownSequenceError",
    "__version__", "available_backends", "formats", "get_backend", "layout", "resolve_backend", "warmup",
]

_old_paths.install()


def __getattr__(name: str):
    """``LLM``, ``SamplingParams`` and ``RequestOutput`` (the engine: :mod:`pagedkv.engine`, which
    needs the ``hf`` extra for ``LLM``), ``plan_memory`` (:mod:`pagedkv.integrations.plan`), and
    the modules of earlier releases (``pagedkv.stores``),
    imported on first use: ``import pagedkv`` imports neither torch nor transformers."""
    if name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput"):
        from . import engine

        return getattr(engine, name)
    if name == "plan_memory":  # reads transformers configs, torch never imported
        from .integrations.plan import plan_memory

        return plan_memory
    return _old_paths.attribute(name)
