"""Front-door checks shared by every backend.

A numba or CUDA kernel has no bounds checks: an index that is out of range
there corrupts memory silently. So every public routine calls these checks
first, and a kernel only ever sees inputs that passed them. Each check raises
a specific :class:`~pagedkv.errors.PagedKVError` that says what was wrong and
what was expected; none of them changes anything.

Index arrays (slot mappings, block tables, context lengths, block lists) are
checked by value, so they must be on the host here; a GPU backend copies them
over before calling these functions (see :func:`host_array`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import (
    ArgumentError,
    BlockCopyError,
    BlockIndexError,
    ContextLengthError,
    ContiguityError,
    DTypeError,
    DuplicateSlotError,
    PoolMismatchError,
    ShapeError,
    SlotIndexError,
)
from ..geometry.layout import INT32_MAX
from ..memory.device import host_array, overlap
from ..memory.pool import KVPool
from . import _scan

FLOAT32 = np.dtype(np.float32)  #: what K, V and q are, whatever the pool stores
INT64 = np.dtype(np.int64)
INT32 = np.dtype(np.int32)


def _is_c_contiguous(a) -> bool:
    flags = getattr(a, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError):
            return bool(flags.c_contiguous)
    return bool(a.is_c_contiguous())


def pool(p: object, device: str | None = None) -> KVPool:
    """Check that ``p`` is a :class:`KVPool` (on ``device`` when given)."""
    if not isinstance(p, KVPool):
        raise PoolMismatchError(f"expected a KVPool, got {type(p).__name__}")
    if device is not None and p.device != device:
        raise PoolMismatchError(f"this backend needs a pool on {device!r}, this one is on {p.device!r}")
    if tuple(p.data.shape) != (p.strides.size,) or p.data.dtype != p.config.storage_dtype:  # kernels trust both
        raise PoolMismatchError(f"the pool's data is {p.data.dtype} {list(p.data.shape)}, not "
                                f"{p.config.storage_dtype} [{p.strides.size}]")
    return p


def layer(p: KVPool, layer: object) -> int:
    """The layer number as an int, checked against ``0 <= layer < num_planes`` (the pool's
    layers of storage: ``num_layers`` unless layer groups share planes)."""
    if type(layer) is int and 0 <= layer < p.strides.num_layers:  # the common case, without the config's
        return layer  # properties (a decode step checks a layer per routine per layer)
    return p.config.check_plane(layer)


def index_array(a, name: str, dtype: np.dtype, ndim: int) -> np.ndarray:
    """A host index array of exactly ``dtype`` and ``ndim`` dimensions, C-contiguous (a strided
    one, ``slots[::2]``, copied: the kernels are compiled for one array layout, not one per
    layout a caller happens to pass)."""
    a = host_array(a, name)
    if a.dtype != dtype:
        raise DTypeError(f"{name} must be {dtype}, got {a.dtype}")
    if a.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def tokens(p: KVPool, name: str, a, num_tokens: int | None = None) -> int:
    """Check a ``[T, H, D]`` float32 C-contiguous array of this pool's heads; return T."""
    c = p.config
    # the common case, a right numpy array (a decode step passes several per layer), in a few
    # attribute reads; anything else takes the checks one by one, for their messages
    if type(a) is np.ndarray and a.dtype == FLOAT32 and a.ndim == 3 and a.shape[1] == c.num_kv_heads \
            and a.shape[2] == c.head_dim and (num_tokens is None or a.shape[0] == num_tokens) \
            and a.flags.c_contiguous:
        return a.shape[0]
    dtype = getattr(a, "dtype", None)
    if dtype is None or not hasattr(a, "shape"):
        raise DTypeError(f"{name} must be an array of float32, got {type(a).__name__}")
    if np.dtype(dtype) != FLOAT32:
        raise DTypeError(f"{name} must be float32 (the pool stores {c.dtype} and encodes it; a write also takes "
                         f"float16 and bfloat16, see formats.widen_input), got {dtype}")
    shape = tuple(a.shape)
    if len(shape) != 3 or shape[1:] != (c.num_kv_heads, c.head_dim):
        raise ShapeError(f"{name} must have shape [T, {c.num_kv_heads}, {c.head_dim}], got {list(shape)}")
    if num_tokens is not None and shape[0] != num_tokens:
        raise ShapeError(f"{name} has {shape[0]} tokens, expected {num_tokens}")
    if not _is_c_contiguous(a):
        raise ContiguityError(f"{name} must be C-contiguous (np.ascontiguousarray makes it so)")
    return shape[0]


def slot_mapping(p: KVPool, slots, num_tokens: int | None, *, unique: bool) -> np.ndarray:
    """Check an int64 ``[T]`` slot mapping; negative slots are padding.

    Every other slot must be below ``num_blocks * block_size``; with
    ``unique=True`` (write destinations) no slot may appear twice.
    """
    slots = index_array(slots, "slot_mapping", INT64, 1)
    if num_tokens is not None and slots.shape[0] != num_tokens:
        raise ShapeError(f"slot_mapping has {slots.shape[0]} entries for {num_tokens} tokens")
    c = p.config
    code, slot, _ = _scan.scan_slots(slots, c.num_slots, unique)
    if code == _scan.SLOT_OUT_OF_RANGE:
        raise SlotIndexError(
            f"slot {slot} is outside the pool: slots run 0..{c.num_slots - 1} "
            f"({c.num_blocks} blocks of {c.block_size}); negative slots mean padding"
        )
    if code == _scan.SLOT_REPEATED:
        raise DuplicateSlotError(f"slot {slot} is written by more than one token of this call")
    return slots


def block_tables_total(p: KVPool, tables, lens,
                       nulls: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Check int32 ``block_tables [B, max_blocks]`` and ``context_lens [B]``.

    Each length must lie in ``0..max_blocks * block_size``, and the blocks a
    sequence actually uses (its first ``ceil(len / block_size)`` entries) must
    be real blocks; entries past that are padding and are never read. A block
    may appear in several tables, or twice in one (shared prefixes do this).
    ``nulls`` (int64 ``[B]``, attention under a sliding window): sequence b's first
    ``nulls[b]`` entries lie wholly before its window and may be -1 (freed).
    Returns the checked arrays and the lengths' total (the packed row count).
    """
    tables = index_array(tables, "block_tables", INT32, 2)
    lens = index_array(lens, "context_lens", INT32, 1)
    if lens.shape[0] != tables.shape[0]:
        raise ShapeError(
            f"context_lens has {lens.shape[0]} entries for {tables.shape[0]} block-table rows"
        )
    c = p.config
    code, b, j, total = _scan.scan_tables(tables, lens, c.block_size, c.num_blocks,
                                          _NO_NULLS if nulls is None else nulls)
    if code == _scan.LEN_NEGATIVE:
        raise ContextLengthError(f"context_lens[{b}] = {lens[b]} is negative")
    if code == _scan.LEN_TOO_LONG:
        raise ContextLengthError(
            f"context_lens[{b}] = {lens[b]} needs more than the {tables.shape[1]} "
            f"blocks of its block-table row ({tables.shape[1] * c.block_size} tokens)"
        )
    if code == 0 and total > INT32_MAX:  # packed outputs are indexed in int32
        raise ContextLengthError(f"context_lens add up to {int(total)}, more than int32 holds")
    if code == _scan.TABLE_ENTRY_BAD:
        if tables[b, j] == -1:
            raise BlockIndexError(
                f"block_tables[{b}, {j}] = -1 is a null entry (padding, or a block freed out of a sliding "
                f"window) but sequence {b} reads its positions {j * c.block_size}..{(j + 1) * c.block_size - 1}"
                f"{'' if nulls is None else ', inside the window of its first query'}"
            )
        raise BlockIndexError(
            f"block_tables[{b}, {j}] = {tables[b, j]} is not a block "
            f"(0..{c.num_blocks - 1}) but sequence {b} uses it"
        )
    return tables, lens, int(total)


def block_tables(p: KVPool, tables, lens, nulls: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`block_tables_total` without the total: the checked ``(block_tables, context_lens)``."""
    tables, lens, _ = block_tables_total(p, tables, lens, nulls)
    return tables, lens


_NO_NULLS = np.zeros(0, dtype=np.int64)


def block_copies(src_pool: KVPool, dst_pool: KVPool, src, dst) -> tuple[np.ndarray, np.ndarray]:
    """Check a list of block copies ``src[i] -> dst[i]``, applied as if all at once.

    Within one pool, a copy list is only well defined if no block is copied
    onto itself and no destination is also a source (otherwise the result
    would depend on the order of the copies). Across two pools only the
    destinations must be distinct. Both pools must have the same geometry.
    """
    if not src_pool.same_geometry(dst_pool):
        raise PoolMismatchError(
            f"pools differ in geometry: {src_pool.strides} vs {dst_pool.strides}"
        )
    if src_pool.config.dtype != dst_pool.config.dtype:
        raise PoolMismatchError(f"pools store different formats: {src_pool.config.dtype} vs {dst_pool.config.dtype}")
    src_scales, dst_scales = src_pool.kv_scales, dst_pool.kv_scales
    if src_scales is not None and dst_scales is not None and not np.array_equal(src_scales, dst_scales):
        raise PoolMismatchError("fp8 pools with different k/v scales: their bytes mean different numbers")
    src = index_array(src, "src", INT64, 1)
    dst = index_array(dst, "dst", INT64, 1)
    if src.shape != dst.shape:
        raise ShapeError(f"src has {src.size} blocks, dst has {dst.size}")
    nb = src_pool.config.num_blocks
    # Two pool objects over one buffer (a copy.copy of a pool) are one pool: the same rules.
    same = src_pool is dst_pool or overlap(src_pool.data, dst_pool.data)
    code, a, b = _scan.scan_copies(src, dst, nb, nb, same)
    if code == _scan.BLOCK_OUT_OF_RANGE:
        raise BlockIndexError(f"{('src', 'dst')[a]} names block {b}; blocks run 0..{nb - 1}")
    if code == _scan.DST_REPEATED:
        raise BlockCopyError(f"block {a} is the destination of more than one copy")
    if code == _scan.COPY_ONTO_ITSELF:
        raise BlockCopyError(f"block {a} is copied onto itself")
    if code == _scan.DST_IS_SRC:
        raise BlockCopyError(
            f"block {a} is both a source and a destination; split the copies into two calls"
        )
    return src, dst


# One combined check per routine, so every backend validates identically.

def step_tokens(p: KVPool, key, value, num_slots: int) -> None:
    """Check a write's ``key`` and ``value`` (``[T, H, D]`` each, see :func:`tokens`) against
    a slot mapping of ``num_slots`` entries."""
    t = tokens(p, "key", key)
    tokens(p, "value", value, t)
    if t != num_slots:
        raise ShapeError(f"slot_mapping has {num_slots} entries for {t} tokens")


def outputs(p: KVPool, out, num_tokens: int) -> None:
    """Check ``out``: None, or a pair ``(key, value)`` of separate ``[T, H, D]`` float32 arrays."""
    if out is None:
        return
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ShapeError(f"out must be a pair (key, value) of arrays, got {type(out).__name__}")
    k, v = out
    if type(k) is np.ndarray and type(v) is np.ndarray and k is not v and p.scales is None:
        # the common case, two right numpy arrays beside a host pool, in one expression (the
        # checks one by one below cost a decode-sized gather a visible share of its time)
        c, data = p.config, p.data
        shape = (num_tokens, c.num_kv_heads, c.head_dim)
        kf, vf = k.flags, v.flags
        if k.shape == shape and v.shape == shape and k.dtype == FLOAT32 and v.dtype == FLOAT32 \
                and kf.c_contiguous and vf.c_contiguous and kf.writeable and vf.writeable \
                and type(data) is np.ndarray and not np.may_share_memory(k, data) \
                and not np.may_share_memory(v, data) and not np.may_share_memory(k, v):
            return
    for i in (0, 1):
        tokens(p, f"out[{i}]", out[i], num_tokens)
        if isinstance(out[i], np.ndarray) and not out[i].flags.writeable:
            raise ArgumentError(f"out[{i}] is read-only; the results are written into it")
        if overlap(out[i], p.data) or (p.scales is not None and overlap(out[i], p.scales)):
            raise ArgumentError(f"out[{i}] overlaps the pool's memory: the results would overwrite the cache")
    if out[0] is out[1] or overlap(out[0], out[1]):
        raise ShapeError("out[0] and out[1] overlap; keys and values need separate buffers")


def no_out_with_raw(out) -> None:
    """``raw=True`` returns new arrays of the stored dtype: it takes no ``out``."""
    if out is not None:
        raise ArgumentError("raw=True returns the stored elements in new arrays; it takes no out=")


def read_args(p, layer_, slots, out, device: str) -> tuple[int, np.ndarray]:
    """Everything :func:`read` needs checked; returns ``(layer, host slot_mapping)``."""
    pool(p, device)
    layer_ = layer(p, layer_)
    slots = slot_mapping(p, slots, None, unique=False)
    outputs(p, out, slots.shape[0])
    return layer_, slots


def gather_args(p, layer_, tables, lens, out, device: str) -> tuple[int, np.ndarray, np.ndarray, int]:
    """Everything :func:`gather` needs checked; returns ``(layer, block_tables, context_lens,
    total)``, the last the lengths' sum (the packed row count)."""
    pool(p, device)
    layer_ = layer(p, layer_)
    tables, lens, total = block_tables_total(p, tables, lens)
    outputs(p, out, total)
    return layer_, tables, lens, total


def copy_args(src_pool, dst_pool, src, dst, src_device: str, dst_device: str):
    """Everything :func:`copy_blocks` / :func:`swap_blocks` need checked; returns host ``(src, dst)``."""
    pool(src_pool, src_device)
    pool(dst_pool, dst_device)
    return block_copies(src_pool, dst_pool, src, dst)


def queries(p: KVPool, q, num_rows: int, decode: bool) -> None:
    """Check attention queries: float32 C-contiguous ``[num_rows, Hq, D]`` with ``Hq`` a
    multiple of the cache's ``H`` (grouped-query attention); ``num_rows`` is one a
    sequence when ``decode``, else the sum of the query lengths."""
    c = p.config
    dtype = getattr(q, "dtype", None)
    if dtype is None or not hasattr(q, "shape") or np.dtype(dtype) != FLOAT32:
        raise DTypeError(f"q must be an array of float32, got {dtype if dtype is not None else type(q).__name__}")
    shape = tuple(q.shape)
    if len(shape) != 3 or shape[2] != c.head_dim:
        raise ShapeError(f"q must have shape [N, Hq, {c.head_dim}], got {list(shape)}")
    if shape[1] == 0 or shape[1] % c.num_kv_heads:
        raise ShapeError(
            f"q has {shape[1]} heads; grouped-query attention needs a multiple of the cache's {c.num_kv_heads}"
        )
    if shape[0] != num_rows and decode:
        raise ShapeError(f"decode attention needs one query per sequence: q has {shape[0]} rows "
                         f"for {num_rows} sequences")
    if shape[0] != num_rows:
        raise ShapeError(f"q has {shape[0]} rows but query_lens add up to {num_rows}")
    if not _is_c_contiguous(q):
        raise ContiguityError("q must be C-contiguous (np.ascontiguousarray makes it so)")


def query_lens(lens: np.ndarray, qlens) -> np.ndarray:
    """Check int32 ``query_lens [B]``: each in ``0..context_lens[b]``."""
    qlens = index_array(qlens, "query_lens", INT32, 1)
    if qlens.shape != lens.shape:
        raise ShapeError(f"query_lens has {qlens.shape[0]} entries for {lens.shape[0]} sequences")
    bad = np.flatnonzero((qlens < 0) | (qlens > lens))
    if bad.size:
        b = int(bad[0])
        raise ContextLengthError(f"query_lens[{b}] = {qlens[b]} must lie in 0..context_lens[{b}] = {lens[b]}")
    return qlens


class AttentionOptions(NamedTuple):
    """Checked scalar options of ``paged_attention``."""

    scale: float
    window: int  # 0: no sliding window
    soft_cap: float  # 0: no soft cap


def attention_options(p: KVPool, scale, sliding_window, soft_cap) -> AttentionOptions:
    """Check the scalar options of ``paged_attention``; ``scale`` defaults to ``1 / sqrt(D)``."""
    scale = 1.0 / float(np.sqrt(p.config.head_dim)) if scale is None else _finite(scale, "scale")
    if scale == 0:
        raise ArgumentError("scale must not be 0")
    window = 0
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)) \
                or not 1 <= sliding_window <= INT32_MAX:
            raise ArgumentError(f"sliding_window must be an integer in 1..{INT32_MAX} (context lengths "
                                f"are int32), got {sliding_window!r}")
        window = int(sliding_window)
    cap = 0.0
    if soft_cap is not None:
        cap = _finite(soft_cap, "soft_cap")
        if cap <= 0:
            raise ArgumentError(f"soft_cap must be positive, got {soft_cap!r}")
    return AttentionOptions(scale, window, cap)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite(x, name: str) -> float:
    """``x`` as a float that float32 kernels can use: finite, within float32's range, and not
    a non-zero number that float32 rounds to zero."""
    try:
        x = float(x)
    except OverflowError:  # an int past float64's range
        raise ArgumentError(f"{name} = {x} is outside float32's range (the kernels compute in float32)") from None
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number, got {x!r}") from None
    if not np.isfinite(x):
        raise ArgumentError(f"{name} must be finite, got {x}")
    if abs(x) > _FLOAT32_MAX or (x != 0 and np.float32(x) == 0):
        raise ArgumentError(f"{name} = {x} is outside float32's range (the kernels compute in float32)")
    return x
