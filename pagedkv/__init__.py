"""pagedkv: a paged (vLLM-style) KV cache for LLM inference.

The keys and values of every past token live in fixed-size blocks of one flat
pool (:class:`KVPool`, arithmetic in :mod:`pagedkv.layout`; float32 or one of the
16- and 8-bit formats of :mod:`pagedkv.formats`), so memory
is taken block by block as sequences grow and blocks can be shared between
sequences. The routines that move data in and out of the pool exist in several
backends that agree exactly with the numpy reference (:func:`get_backend`).

Where things live, from the bottom up (a module imports only from below it):

- ``errors``, ``layout`` (the arithmetic: offsets, slots, ragged batches),
  ``formats`` (the storage formats and their exact codecs),
  ``config``, ``device`` (host or GPU arrays), ``pool`` (:class:`KVPool`);
- ``validate`` (front-door checks) and ``plan`` (a step's checked index
  arrays, made once, run per layer);
- ``backends`` (``numpy`` reference, ``numba``, ``cuda``: one :class:`Backend` protocol);
- ``block_pool`` (free blocks, reference counts, the prefix-cache index),
  ``block_table`` (the int32 rows), ``prefix_key`` (the chained block keys),
  ``prefix_cache``, ``manager`` (:class:`BlockManager`: sequences, forks, appends);
- ``cache`` (:class:`PagedKVCache`, the facade), then ``model``, ``demo``,
  ``bench`` and ``cli``; ``testing`` is the conformance kit.
"""

from . import formats, layout
from ._version import __version__
from .backends import BACKENDS, Backend, available_backends, get_backend, resolve_backend
from .block_pool import BlockPool
from .cache import Added, PagedKVCache, Step
from .config import CacheConfig, LayerGroup
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
from .events import AllBlocksCleared, BlockRemoved, BlockStored, EventLog
from .layout import Strides
from .manager import BlockManager
from .plan import Plan
from .pool import KVPool
from .sequence import Appended

__all__ = [
    "AllBlocksCleared", "BlockRemoved", "BlockStored", "EventLog", "events",
    "BACKENDS", "Added", "AllocatorError", "Appended", "ArgumentError", "Backend", "BackendUnavailableError",
    "BlockCopyError", "BlockIndexError", "BlockManager", "BlockPool", "CacheConfig", "ConfigError",
    "ContextLengthError", "ContiguityError", "DTypeError", "DuplicateSlotError", "InvariantError", "KVPool",
    "LayerGroup", "LayerIndexError", "OutOfBlocksError", "PagedKVCache", "PagedKVError", "Plan", "PoolMismatchError",
    "SequenceExistsError", "ShapeError", "SlotIndexError", "Step", "StepError", "Strides", "UnknownSequenceError",
    "__version__", "available_backends", "formats", "get_backend", "layout", "resolve_backend",
]
