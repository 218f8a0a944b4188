"""pagedkv: a paged (vLLM-style) KV cache for LLM inference.

The keys and values of every past token live in fixed-size blocks of one flat
float32 pool (:class:`KVPool`, arithmetic in :mod:`pagedkv.layout`), so memory
is taken block by block as sequences grow and blocks can be shared between
sequences. The routines that move data in and out of the pool exist in several
backends that agree exactly with the numpy reference (:func:`get_backend`).
"""

from .allocator import BlockAllocator
from .cache import Added, PagedKVCache, Step
from .backends import BACKENDS, available_backends, get_backend
from .config import CacheConfig
from .errors import (
    AllocatorError, ArgumentError, BackendUnavailableError, BlockCopyError, BlockIndexError, ConfigError,
    ContextLengthError, ContiguityError, DTypeError, DuplicateSlotError, InvariantError,
    LayerIndexError, OutOfBlocksError, PagedKVError, PoolMismatchError, ShapeError,
    SlotIndexError, UnknownSequenceError,
)
from .layout import Strides
from .manager import Appended, BlockManager, SequenceExistsError
from .pool import KVPool

__version__ = "0.1.0"

__all__ = [
    "Added", "PagedKVCache", "Step", "Appended", "ArgumentError", "BlockAllocator", "BlockManager", "SequenceExistsError", "BACKENDS", "AllocatorError", "BackendUnavailableError", "BlockCopyError", "BlockIndexError",
    "CacheConfig", "ConfigError", "ContextLengthError", "ContiguityError", "DTypeError",
    "DuplicateSlotError", "InvariantError", "KVPool", "LayerIndexError", "OutOfBlocksError",
    "PagedKVError", "PoolMismatchError", "ShapeError", "SlotIndexError", "Strides",
    "UnknownSequenceError", "available_backends", "get_backend", "__version__",
]
