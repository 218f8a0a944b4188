"""The exact reference: every kernel in plain numpy on the flat pool.

This is the truth the other backends are tested against, and it is written to
be read. Each kernel turns its slots or blocks into flat offsets with the
arithmetic of :mod:`pagedkv.geometry.layout`, then moves numbers with one fancy-indexed
assignment. Nothing here is clever; speed lives in the numba and CUDA backends.

The routines themselves (``write``, ``read``, ``gather``, ``copy_blocks``, ``swap_blocks``,
``paged_attention`` and the step API ``plan``, ``write_step``, ``attention_step``) are
:mod:`pagedkv.ops.routines` bound to these kernels: their documentation and every check of
their arguments are there, once for every backend. By the time a kernel here runs, its
arguments are checked (:mod:`pagedkv.ops.base` states the contract).
"""

from __future__ import annotations

import sys

import numpy as np

from ..geometry import formats, layout
from ..geometry.layout import K, V
from ..memory.pool import KVPool
from ..ops.plan import AttentionPlan, WritePlan
from ..ops.routines import bind
from ..ops.validate import AttentionOptions
from ._host import (  # the host side of the contract, the same for both CPU backends
    element_index,
    load_raw,
    new_outputs,
    on_device,
    scale_index,
    stored_at,
    swap_devices,
    to_index,
    to_outputs,
    to_queries,
    to_tokens,
)

NAME = "numpy"
DEVICE = "cpu"

__all__ = [  # the routines, then the kernel contract (pagedkv.ops.base.Kernels)
    "NAME", "DEVICE", "write", "read", "gather", "copy_blocks", "swap_blocks", "paged_attention", "plan", "write_step",
    "attention_step", "new_outputs", "to_tokens", "to_queries", "to_outputs", "to_index", "on_device", "store",
    "attend", "load", "gather_rows", "load_raw", "swap_devices", "move_blocks",
]


def _store(pool: KVPool, layer: int, kv: int, slots: np.ndarray, x: np.ndarray) -> None:
    """Encode float32 ``x [T, H, D]`` in the pool's format and store it at ``slots`` (all >= 0)."""
    fmt, s = pool.config.format, pool.strides
    at = element_index(s, layer, kv, slots)
    if fmt.is_float32:
        pool.host[at] = x
    elif fmt.scale == "token":  # int8: a scale per (token, head)
        q, scale = formats.quantize_int8(x)
        pool.host[at] = q
        pool.host_scales[scale_index(s, layer, kv, slots)] = scale
    else:
        if fmt.scale == "tensor":  # fp8: stored = encode(x / scale)
            x = x / pool.kv_scales[layer, kv]  # type: ignore[index]
        pool.host[at] = formats.encode(fmt, x)


def _load(pool: KVPool, layer: int, kv: int, slots: np.ndarray) -> np.ndarray:
    """The float32 values ``[T, H, D]`` stored at ``slots`` (all >= 0), decoded."""
    stored, scale = stored_at(pool, layer, kv, slots)
    if scale is None and pool.kv_scales is not None:  # fp8: read = decode(stored) * scale
        scale = pool.kv_scales[layer, kv]
    return formats.to_float32(pool.config.format, stored, scale)


def store(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, w: WritePlan) -> None:
    """Store token t at slot ``w.slot_mapping[t]``; padding tokens (negative slots) are skipped."""
    slots = w.slot_mapping
    real = slots >= 0
    for kv, new in ((K, key), (V, value)):
        _store(pool, layer, kv, slots[real], new[real])


def load(pool: KVPool, layer: int, slots: np.ndarray, at: np.ndarray, out_k: np.ndarray, out_v: np.ndarray) -> None:
    """Decode the tokens at ``slots`` into the rows of ``out_k``/``out_v``; padding reads as zeros."""
    real = slots >= 0
    for kv, x in ((K, out_k), (V, out_v)):
        x[~real] = 0.0
        x[real] = _load(pool, layer, kv, slots[real])


def gather_rows(pool: KVPool, layer: int, tables: np.ndarray, at: np.ndarray, lens: np.ndarray, out_k: np.ndarray,
                out_v: np.ndarray) -> np.ndarray:
    """Each sequence's tokens in order: its slots (:func:`pagedkv.geometry.layout.gather_slots`), loaded."""
    slots = layout.gather_slots(tables, lens, pool.config.block_size)
    load(pool, layer, slots, slots, out_k, out_v)
    return layout.cu_seqlens(lens)


def move_blocks(src_pool: KVPool, dst_pool: KVPool, src, dst, src_host: np.ndarray, dst_host: np.ndarray) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer, K and V, with their int8 scales."""
    s = src_pool.strides
    within = np.arange(s.block_stride)  # a block is one contiguous run in either layout
    scales_within = np.arange(s.block_size * s.num_kv_heads)  # and so are its scales
    for layer in range(s.num_layers):
        for kv in (K, V):
            src_base = layout.block_base(layer, kv, src_host, s)
            dst_base = layout.block_base(layer, kv, dst_host, s)
            dst_pool.host[dst_base[:, None] + within] = src_pool.host[src_base[:, None] + within]
            if src_pool.scales is not None and dst_pool.scales is not None:
                src_at = layout.block_scale_base(layer, kv, src_host, s)[:, None] + scales_within
                dst_at = layout.block_scale_base(layer, kv, dst_host, s)[:, None] + scales_within
                dst_pool.host_scales[dst_at] = src_pool.host_scales[src_at]


def attend(q: np.ndarray, pool: KVPool, layer: int, a: AttentionPlan, opt: AttentionOptions) -> np.ndarray:
    """The plain math of :func:`pagedkv.ops.routines.paged_attention`, in float64 on a gathered
    copy of each sequence's keys and values, rounded to float32 once."""
    c = pool.config
    group = q.shape[1] // c.num_kv_heads
    out = np.zeros(q.shape, dtype=np.float32)
    slots = layout.gather_slots(a.block_tables, a.context_lens, c.block_size)
    keys, values = new_outputs(pool, slots.shape[0])
    load(pool, layer, slots, slots, keys, values)
    cu = layout.cu_seqlens(a.context_lens)
    for r in np.flatnonzero(a.row_pos >= 0):
        b, pos = a.row_seq[r], int(a.row_pos[r])
        first = layout.window_start(pos, opt.window)
        # only the positions this query sees are read: a masked one, NaN or not, contributes nothing
        k = keys[cu[b] + first:cu[b] + pos + 1].astype(np.float64)  # [L, H, D]
        v = values[cu[b] + first:cu[b] + pos + 1].astype(np.float64)
        qs = q[r].astype(np.float64).reshape(c.num_kv_heads, group, c.head_dim)
        with np.errstate(invalid="ignore", over="ignore"):  # a visible NaN or inf: carried, as documented
            scores = np.einsum("hgd,lhd->hgl", qs, k) * opt.scale  # [H, group, L]
            if opt.soft_cap:
                scores = opt.soft_cap * np.tanh(scores / opt.soft_cap)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            out[r] = np.einsum("hgl,lhd->hgd", weights, v).reshape(-1, c.head_dim)
    return out


# the routines, bound to these kernels
write, read, gather, copy_blocks, swap_blocks, paged_attention, plan, write_step, attention_step = \
    bind(sys.modules[__name__])
