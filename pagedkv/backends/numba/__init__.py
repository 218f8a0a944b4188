"""The routines as parallel CPU kernels compiled by ``numba.njit``.

The routines are :mod:`pagedkv.ops.routines` bound to the kernels here (same checks, same
errors as every backend); each kernel takes the checked arrays and the layout's strides (one
integer :class:`~pagedkv.geometry.layout.Strides` tuple). The kernels call
the helpers of :mod:`pagedkv.geometry.layout` compiled for the CPU, so the arithmetic
is the reference's, line for line; one kernel serves both layouts because
only the strides differ.

Kernels are compiled on first use (1-10 s each, once per storage element type;
:mod:`.notice` says so on standard error) and cached on disk (``cache=True``), so a
second process starts fast; :func:`pagedkv.warmup` compiles them ahead of time.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ...geometry.layout import K, V
from ...memory.pool import KVPool
from ...ops.plan import AttentionPlan, WritePlan
from ...ops.routines import bind
from ...ops.validate import AttentionOptions
from .._host import (  # the host side of the contract, the same for both CPU backends
    load_raw,
    new_outputs,
    on_device,
    swap_devices,
    to_index,
    to_outputs,
    to_queries,
    to_tokens,
)
from . import notice  # noqa: F401  (says when kernels compile)
from .codecs import NO_CODEC, SCALE_KINDS, TENSOR, TOKEN
from .common import block_base, block_scale_base, row_scale, scale_index, token_base
from .decode import decode_attention_kernel
from .prefill import tiled_attention_kernel, tiles
from .stream import get_row, put_row, should_stream, store_fence, stream_copy

NAME = "numba"
DEVICE = "cpu"
PREFILL_MIN_ROWS = 4  #: query rows per sequence (on average) from which attention runs tiled
TASKS = 256  #: most tasks a token loop is cut into (runs of consecutive tokens, one fence each when streaming)

# The copies below are slice assignments: numba compiles them to a vectorised
# copy (several times faster than an element loop) with memmove semantics. A pool
# of another format stores and decodes rows through :mod:`.codecs` (see there).

# Token buffers reach the kernels flattened to 1-D (``key.reshape(-1)``, a view):
# numba copies flat slices several times faster than rows of a 3-D array. Their
# uint32 views (``*_bits``) let the encoders work on float32 bit patterns.


@njit(parallel=True, cache=True)
def write_kernel(data, layer, key, value, slots, stream, s, codec, kind, k_scale, v_scale, scales):
    """Store token t of key/value (``[T, H, D]`` float32, C-contiguous) at ``slots[t]`` in the
    pool's format; negative slots are skipped. A task is a run of consecutive tokens; with
    ``stream`` (a large call on a float32 pool) the rows go out with streaming stores, fenced
    at the end of each task (:mod:`.stream`). The flat views and the uint32 bit views
    (the codecs' input) are made here, compiled, rather than by the caller in Python: a
    decode-sized write is short enough for each interpreted array method to show."""
    key, value = key.reshape(key.size), value.reshape(value.size)
    key_bits, value_bits = key.view(np.uint32), value.view(np.uint32)
    n = slots.shape[0]
    step = max(1, (n + TASKS - 1) // TASKS)
    for task in prange((n + step - 1) // step):
        first = np.int64(task) * step  # as int64: numba's parallel loop hands tasks out as uint64
        for t in range(first, min(n, first + step)):
            if slots[t] >= 0:  # else padding
                store_token(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind,
                            k_scale, v_scale, scales)
        if stream:
            store_fence()


def _store_token(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind, k_scale, v_scale,
                 scales):
    """Token ``t``'s K and V rows, every head, stored at ``slots[t]``."""
    slot, num_kv_heads, head_dim = slots[t], s.num_kv_heads, s.head_dim
    k_base, v_base = token_base(layer, K, slot, s), token_base(layer, V, slot, s)
    for h in range(num_kv_heads):
        src = (t * num_kv_heads + h) * head_dim
        put_row(data, k_base + h * s.head_stride, key, key_bits, src, head_dim, codec, kind, k_scale,
                scales, scale_index(layer, K, slot, h, s), stream)
        put_row(data, v_base + h * s.head_stride, value, value_bits, src, head_dim, codec, kind, v_scale,
                scales, scale_index(layer, V, slot, h, s), stream)


# A float32 token (slice copies) is inlined into the kernel; a narrow format's, with its codecs
# inlined in it, is a call of its own: inlined into the parallel loop, whose body numba types
# twice, it made the write kernel's compilation twice as long (see :mod:`.codecs`).
_store_token_call = njit(cache=True)(_store_token)


def store_token(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind, k_scale, v_scale,
                scales):
    """:func:`_store_token`, inlined for a float32 pool, called for a narrow one."""


@overload(store_token, inline="always")
def _store_token_overload(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind, k_scale,
                          v_scale, scales):
    if data.dtype == types.float32:
        return _store_token

    def call(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind, k_scale, v_scale,
             scales):
        _store_token_call(data, layer, key, value, key_bits, value_bits, slots, t, stream, s, codec, kind, k_scale,
                          v_scale, scales)
    return call


@njit(inline="always")
def _load_token(data, layer, slot, out_k, out_v, i, stream, s, codec, kind, k_scale, v_scale, scales):
    """Decode the token stored at ``slot`` into row i of the flat outputs."""
    num_kv_heads, head_dim = s.num_kv_heads, s.head_dim
    k_base, v_base = token_base(layer, K, slot, s), token_base(layer, V, slot, s)
    for h in range(num_kv_heads):
        dst = (i * num_kv_heads + h) * head_dim
        get_row(data, k_base + h * s.head_stride, head_dim, out_k, dst, codec, kind,
                row_scale(layer, K, slot, h, s, kind, k_scale, scales), stream)
        get_row(data, v_base + h * s.head_stride, head_dim, out_v, dst, codec, kind,
                row_scale(layer, V, slot, h, s, kind, v_scale, scales), stream)


@njit(parallel=True, cache=True)
def read_kernel(data, layer, slots, out_k, out_v, stream, s, codec, kind, k_scale, v_scale, scales):
    """Load the token at ``slots[t]`` into row t of the flat outputs; zeros for padding. Tasks
    and ``stream`` as in :func:`write_kernel`."""
    row_len = s.num_kv_heads * s.head_dim
    n = slots.shape[0]
    step = max(1, (n + TASKS - 1) // TASKS)
    for task in prange((n + step - 1) // step):
        first = np.int64(task) * step
        for t in range(first, min(n, first + step)):
            slot = slots[t]
            if slot < 0:
                out_k[t * row_len:(t + 1) * row_len] = 0.0
                out_v[t * row_len:(t + 1) * row_len] = 0.0
                continue
            _load_token(data, layer, slot, out_k, out_v, t, stream, s, codec, kind, k_scale, v_scale, scales)
        if stream:
            store_fence()


@njit(parallel=True, cache=True)
def gather_kernel(data, layer, tables, lens, out_k, out_v, stream, s, codec, kind, k_scale, v_scale, scales):
    """Returns int32 ``cu_seqlens``. A task is one block of one sequence (its running count of
    blocks, from :func:`gather_offsets`); its tokens go to rows ``cu[b] + j * block_size ...``
    of the packed outputs (``[T, H, D]``, C-contiguous, flattened here). In layout NHD a
    block's tokens lie back to back, as in the output, so the block is one run (a copy, or
    one decoding pass unless int8's per-row scales need a pass a row); in HND, row by row
    (streamed: a head's rows in the order they lie).
    ``stream`` as in :func:`write_kernel`.

    The offsets are computed here, not by the caller: a second compiled call would pay numba's
    dispatch of its arguments again, a visible share of a decode-sized gather."""
    block_size, row_len = s.block_size, s.num_kv_heads * s.head_dim
    cu, block_cu = gather_offsets(lens, block_size)
    out_k, out_v = out_k.reshape(out_k.size), out_v.reshape(out_v.size)
    whole_runs = s.pos_stride == row_len and kind != TOKEN
    # HND, streamed: a head's rows read in the order they lie, as the streaming stores write them;
    # plain stores and a narrow format's decoding keep token order (which their loops run best in)
    head_major = stream and s.pos_stride == s.head_dim
    for task in prange(block_cu[block_cu.shape[0] - 1]):
        b = np.searchsorted(block_cu, task, side="right") - 1
        first = (task - block_cu[b]) * block_size
        n = min(block_size, lens[b] - first)
        block, row = np.int64(tables[b, first // block_size]), cu[b] + first
        if whole_runs:
            get_row(data, block_base(layer, K, block, s), n * row_len, out_k, row * row_len, codec, kind, k_scale,
                    stream)
            get_row(data, block_base(layer, V, block, s), n * row_len, out_v, row * row_len, codec, kind, v_scale,
                    stream)
        elif head_major:
            for h in range(s.num_kv_heads):
                _load_head_rows(data, layer, K, block, h, n, out_k, row, stream, s, codec, kind, k_scale, scales)
                _load_head_rows(data, layer, V, block, h, n, out_v, row, stream, s, codec, kind, v_scale, scales)
        else:
            for i in range(n):
                _load_token(data, layer, block * block_size + i, out_k, out_v, row + i, stream, s, codec, kind,
                            k_scale, v_scale, scales)
        if stream:
            store_fence()
    return cu


@njit(inline="always")
def _load_head_rows(data, layer, kv, block, h, n, out, row, stream, s, codec, kind, scale, scales):
    """Decode head h of the first n tokens of ``block`` (K or V) into rows ``row ...`` of the flat
    output, reading the block's rows of that head in the order they lie."""
    at, row_len = block_base(layer, kv, block, s) + h * s.head_stride, s.num_kv_heads * s.head_dim
    for i in range(n):
        get_row(data, at + i * s.pos_stride, s.head_dim, out, (row + i) * row_len + h * s.head_dim, codec, kind,
                row_scale(layer, kv, block * s.block_size + i, h, s, kind, scale, scales), stream)


@njit(cache=True)
def gather_offsets(lens, block_size):
    """int32 ``cu_seqlens`` (as :func:`pagedkv.geometry.layout.cu_seqlens`; lengths checked, their total
    within int32) and int64 block counts before each sequence (the gather kernel's tasks), in
    one compiled pass (two numpy calls would be a visible share of a decode-sized gather)."""
    cu = np.zeros(lens.shape[0] + 1, dtype=np.int32)
    blocks = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    for b in range(lens.shape[0]):
        cu[b + 1] = cu[b] + lens[b]
        blocks[b + 1] = blocks[b] + (lens[b] + block_size - 1) // block_size
    return cu, blocks


@njit(parallel=True, cache=True)
def move_blocks_kernel(src_data, dst_data, src, dst, stream, s):
    """Copy block ``src[i]`` of src_data to ``dst[i]`` of dst_data, every layer, K and V;
    ``stream`` as in :func:`write_kernel` (any element type: the bytes are copied as they are)."""
    halves = s.num_layers * 2
    for job in prange(src.shape[0] * halves):
        i = job // halves
        layer = (job % halves) // 2
        kv = job % 2
        s0 = block_base(layer, kv, src[i], s)
        d0 = block_base(layer, kv, dst[i], s)
        if stream:
            stream_copy(dst_data, d0, src_data, s0, s.block_stride)
            store_fence()
        else:
            dst_data[d0:d0 + s.block_stride] = src_data[s0:s0 + s.block_stride]


@njit(cache=True)
def move_scales_kernel(src_scales, dst_scales, src, dst, s):
    """Copy the int8 scales of blocks ``src[i] -> dst[i]``, every layer, K and V."""
    run = s.block_size * s.num_kv_heads
    for i in range(src.shape[0]):
        for layer in range(s.num_layers):
            for kv in range(2):
                s0, d0 = block_scale_base(layer, kv, src[i], s), block_scale_base(layer, kv, dst[i], s)
                dst_scales[d0:d0 + run] = src_scales[s0:s0 + run]


_NO_SCALES = np.ones(1, np.float32)


def streams_rows(pool: KVPool, num_tokens: int) -> bool:
    """Whether a write, read or gather of ``num_tokens`` tokens streams its float32 rows
    (:mod:`.stream`): a float32 pool, and K and V together at least
    :data:`~.stream.STREAM_MIN_BYTES`."""
    c = pool.config
    return pool.data.dtype == np.float32 and should_stream(2 * num_tokens * c.num_kv_heads * c.head_dim * 4)


def streams_blocks(pool: KVPool, num_blocks: int) -> bool:
    """Whether copying ``num_blocks`` whole blocks (every layer, K and V) streams them."""
    s = pool.strides
    return should_stream(num_blocks * s.num_layers * 2 * s.block_stride * pool.data.dtype.itemsize)


def _format_args(pool: KVPool, layer: int) -> tuple:
    """``(codec, kind, k_scale, v_scale, scales)``: the pool's format, as the kernels take it."""
    fmt = pool.config.format
    kind = SCALE_KINDS[fmt.scale]
    k_scale = v_scale = np.float32(1.0)
    if kind == TENSOR:
        k_scale, v_scale = (np.float32(x) for x in pool.kv_scales[layer])  # type: ignore[index]
    scales = pool.host_scales if kind == TOKEN else _NO_SCALES
    return fmt.codec or NO_CODEC, kind, k_scale, v_scale, scales


# ---- the kernel contract (pagedkv.ops.base.Kernels) ------------------------------------------------

def store(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, w: WritePlan) -> None:
    """The write kernel, streaming when the call is large (:func:`streams_rows`)."""
    write_kernel(pool.data, layer, key, value, w.kernel_slots, streams_rows(pool, key.shape[0]), pool.strides,
                 *_format_args(pool, layer))


def decode_heads_per_task(pool: KVPool) -> int:
    """K/V heads one task of the decode-attention kernel takes: all of them in layout NHD, which
    keeps a token's heads together (one task reads each block in order), one in HND."""
    return pool.config.num_kv_heads if pool.config.layout == "NHD" else 1


def attend(q: np.ndarray, pool: KVPool, layer: int, a: AttentionPlan, opt: AttentionOptions) -> np.ndarray:
    """Tiled prefill attention when the rows are many per sequence, else decode attention; in float32."""
    out = np.empty(q.shape, dtype=np.float32)
    if a.query_lens is not None and a.num_rows >= PREFILL_MIN_ROWS * a.query_lens.shape[0]:
        # prefill: tiles of query rows stream each block once per tile, not once per row
        first, rows = tiles(a.query_lens)
        tiled_attention_kernel(pool.data, layer, q, a.kernel_tables, a.kernel_row_seq, a.kernel_row_pos, first,
                               rows, out, opt.window, np.float32(opt.scale), np.float32(opt.soft_cap),
                               pool.strides, *_format_args(pool, layer))
        return out
    decode_attention_kernel(pool.data, layer, q, a.kernel_tables, a.kernel_row_seq, a.kernel_row_pos, out, opt.window,
                            np.float32(opt.scale), np.float32(opt.soft_cap), decode_heads_per_task(pool),
                            pool.strides, *_format_args(pool, layer))
    return out


def load(pool: KVPool, layer: int, slots: np.ndarray, at: np.ndarray, out_k: np.ndarray, out_v: np.ndarray) -> None:
    """The read kernel over the flat outputs."""
    read_kernel(pool.data, layer, at, out_k.reshape(-1), out_v.reshape(-1), streams_rows(pool, slots.shape[0]),
                pool.strides, *_format_args(pool, layer))


def gather_rows(pool: KVPool, layer: int, tables: np.ndarray, at: np.ndarray, lens: np.ndarray, out_k: np.ndarray,
                out_v: np.ndarray) -> np.ndarray:
    """The gather kernel (which computes ``cu_seqlens`` as it goes)."""
    return gather_kernel(pool.data, layer, at, lens, out_k, out_v, streams_rows(pool, out_k.shape[0]), pool.strides,
                         *_format_args(pool, layer))


def move_blocks(src_pool: KVPool, dst_pool: KVPool, src, dst, src_host: np.ndarray, dst_host: np.ndarray) -> None:
    """Whole blocks in one parallel kernel, streaming when many; int8's scales after them."""
    move_blocks_kernel(src_pool.data, dst_pool.data, src_host, dst_host, streams_blocks(src_pool, src_host.shape[0]),
                       src_pool.strides)
    if src_pool.scales is not None:  # int8: the scales go with their blocks
        move_scales_kernel(src_pool.host_scales, dst_pool.host_scales, src_host, dst_host, src_pool.strides)


__all__ = [  # the routines, then the kernel contract (pagedkv.ops.base.Kernels)
    "NAME", "DEVICE", "write", "read", "gather", "copy_blocks", "swap_blocks", "paged_attention", "plan", "write_step",
    "attention_step", "new_outputs", "to_tokens", "to_queries", "to_outputs", "to_index", "on_device", "store",
    "attend", "load", "gather_rows", "load_raw", "swap_devices", "move_blocks",
]

# the routines, bound to these kernels
write, read, gather, copy_blocks, swap_blocks, paged_attention, plan, write_step, attention_step = \
    bind(sys.modules[__name__])
