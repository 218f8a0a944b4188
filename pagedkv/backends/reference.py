"""The exact reference: every routine in plain numpy on the flat pool.

This is the truth the other backends are tested against, and it is written to
be read. Each routine turns its slots or blocks into flat offsets with the
arithmetic of :mod:`pagedkv.layout`, then moves numbers with one fancy-indexed
assignment. Nothing here is clever; speed lives in the numba and CUDA backends.
"""

from __future__ import annotations

import numpy as np

from .. import layout, validate
from ..layout import K, V, Strides
from ..pool import KVPool

NAME = "numpy"
DEVICE = "cpu"


def _element_index(s: Strides, layer: int, kv: int, slots: np.ndarray) -> np.ndarray:
    """Flat offsets ``[T, H, D]`` of every number of the tokens stored at ``slots`` (all >= 0)."""
    rows = layout.token_base(
        layer, kv, slots.astype(np.int64), s.block_size,
        s.layer_stride, s.kv_stride, s.block_stride, s.pos_stride,
    )
    heads = np.arange(s.num_kv_heads) * s.head_stride
    dims = np.arange(s.head_dim)
    return rows[:, None, None] + heads[None, :, None] + dims[None, None, :]


def write(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Store ``key[t]`` and ``value[t]`` at slot ``slot_mapping[t]`` of ``layer`` (reshape_and_cache).

    Args:
        pool: a CPU :class:`KVPool`.
        layer: ``0 <= layer < num_layers``.
        key, value: float32 ``[T, H, D]``, C-contiguous.
        slot_mapping: int64 ``[T]``; a negative slot marks padding and its token is skipped.

    Raises:
        PagedKVError: a wrong dtype, shape or contiguity, a slot outside the
            pool, or two tokens aimed at one slot. The pool is then unchanged.
    """
    layer, slot_mapping = validate.write_args(pool, layer, key, value, slot_mapping, DEVICE)
    real = slot_mapping >= 0  # padding tokens are skipped
    for kv, new in ((K, key), (V, value)):
        pool.data[_element_index(pool.strides, layer, kv, slot_mapping[real])] = new[real]


def new_outputs(pool: KVPool, num_tokens: int, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``out`` if given, else two new float32 ``[num_tokens, H, D]`` arrays."""
    if out is not None:
        return out[0], out[1]
    c = pool.config
    shape = (num_tokens, c.num_kv_heads, c.head_dim)
    return np.empty(shape, dtype=c.dtype), np.empty(shape, dtype=c.dtype)


def _read(pool: KVPool, layer: int, slots: np.ndarray, out) -> tuple[np.ndarray, np.ndarray]:
    real = slots >= 0
    result = new_outputs(pool, slots.shape[0], out)
    for kv, x in zip((K, V), result):
        x[~real] = 0.0  # padding reads as zeros
        x[real] = pool.data[_element_index(pool.strides, layer, kv, slots[real])]
    return result


def read(pool: KVPool, layer: int, slot_mapping: np.ndarray, *, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Load the keys and values stored at ``slot_mapping`` (the inverse of :func:`write`).

    Args:
        slot_mapping: int64 ``[T]``; a slot may repeat; a negative slot gives zeros.
        out: optional ``(key, value)`` float32 ``[T, H, D]`` arrays to fill
            instead of allocating (a decode loop reuses them).

    Returns:
        ``(key, value)``, float32 ``[T, H, D]`` each (``out`` itself if given).
    """
    layer, slot_mapping = validate.read_args(pool, layer, slot_mapping, out, DEVICE)
    return _read(pool, layer, slot_mapping, out)


def gather_slots(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Slots of every cached token, sequence after sequence, in token order: int64 ``[sum(lens)]``."""
    parts = []
    for row, n in zip(block_tables.astype(np.int64), context_lens):
        positions = np.arange(n)
        parts.append(layout.table_slot(row[positions // block_size], positions, block_size))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def cu_seqlens(context_lens: np.ndarray) -> np.ndarray:
    """Start offsets of each sequence in packed output: int32 ``[B + 1]``, last = total."""
    out = np.zeros(context_lens.shape[0] + 1, dtype=np.int32)
    np.cumsum(context_lens, out=out[1:])
    return out


def gather(
    pool: KVPool, layer: int, block_tables: np.ndarray, context_lens: np.ndarray, *, out=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy each sequence's keys and values, in token order, into packed buffers.

    Args:
        block_tables: int32 ``[B, max_blocks]``: sequence b's token p lives in
            block ``block_tables[b, p // block_size]``. Entries past a
            sequence's length are never read; a block may repeat.
        context_lens: int32 ``[B]``, tokens cached per sequence (0 allowed).
        out: optional ``(key, value)`` float32 ``[sum(context_lens), H, D]``
            arrays to fill instead of allocating.

    Returns:
        ``(key, value, cu_seqlens)``: float32 ``[sum(context_lens), H, D]``
        twice, and int32 ``[B + 1]`` with sequence b at rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]``.
    """
    layer, block_tables, context_lens = validate.gather_args(pool, layer, block_tables, context_lens, out, DEVICE)
    slots = gather_slots(block_tables, context_lens, pool.config.block_size)
    key, value = _read(pool, layer, slots, out)
    return key, value, cu_seqlens(context_lens)


def _move_blocks(src_data: np.ndarray, dst_data: np.ndarray, s: Strides, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer, K and V."""
    within = np.arange(s.block_stride)  # a block is one contiguous run in either layout
    for layer in range(s.num_layers):
        for kv in (K, V):
            src_base = layout.block_base(layer, kv, src, s.layer_stride, s.kv_stride, s.block_stride)
            dst_base = layout.block_base(layer, kv, dst, s.layer_stride, s.kv_stride, s.block_stride)
            dst_data[dst_base[:, None] + within] = src_data[src_base[:, None] + within]


def copy_blocks(pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy whole blocks ``src[i] -> dst[i]``, every layer, K and V (copy-on-write, fork).

    Args:
        src, dst: int64 ``[N]`` block ids. The copies happen as if at once, so
            no block may be copied onto itself, be the destination of two
            copies, or be both a source and a destination.
    """
    src, dst = validate.copy_args(pool, pool, src, dst, DEVICE, DEVICE)
    _move_blocks(pool.data, pool.data, pool.strides, src, dst)


def swap_blocks(src_pool: KVPool, dst_pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy blocks ``src[i]`` of ``src_pool`` to ``dst[i]`` of ``dst_pool`` (offload, reload).

    The pools must have the same geometry; destinations must be distinct. With
    one pool as both, the rules of :func:`copy_blocks` apply.
    """
    src, dst = validate.copy_args(src_pool, dst_pool, src, dst, DEVICE, DEVICE)
    _move_blocks(src_pool.data, dst_pool.data, src_pool.strides, src, dst)


def paged_attention(q: np.ndarray, pool: KVPool, layer: int, block_tables: np.ndarray, context_lens: np.ndarray,
                    *, scale: float | None = None, sliding_window: int | None = None,
                    soft_cap: float | None = None, query_lens: np.ndarray | None = None) -> np.ndarray:
    """Attention of new queries over each sequence's cached keys and values, straight from the blocks.

    For each query row, at position ``pos`` of sequence b::

        s_i   = scale * q . K_i                    for the visible positions i
        s_i   = cap * tanh(s_i / cap)              with soft_cap (Gemma 2)
        out   = sum_i softmax(s)_i * V_i

    where position i is visible if ``i <= pos`` (causal) and, with a
    sliding window W, ``i > pos - W``.

    Args:
        q: float32 ``[B, Hq, D]`` (decode: row b is the newest token of
            sequence b, whose own K/V is already written, at position
            ``context_lens[b] - 1``), or ``[sum(query_lens), Hq, D]`` with
            ``query_lens``. ``Hq`` is a multiple of the cache's ``H``; query
            head ``hq`` reads K/V head ``hq // (Hq // H)`` (grouped-query
            attention; MQA and MHA are the edge cases).
        block_tables, context_lens: as for :func:`gather`.
        scale: defaults to ``1 / sqrt(D)``.
        sliding_window: keep only the last W positions (the query's own included).
        soft_cap: apply ``cap * tanh(s / cap)`` to the scaled scores.
        query_lens: int32 ``[B]``: sequence b's queries are its last
            ``query_lens[b]`` positions, each attending causally (prefill,
            chunked prefill, speculative verification).

    Returns:
        float32 ``[rows, Hq, D]``; zeros for a sequence with no context.

    This reference does the plain math in float64 on a gathered copy, and
    rounds the result to float32 once; the fast backends stream over the
    blocks in float32 (see the tests for the tolerance between them).
    """
    a = validate.attention_args(pool, layer, q, block_tables, context_lens, scale, sliding_window,
                                soft_cap, query_lens, DEVICE)
    c = pool.config
    group = q.shape[1] // c.num_kv_heads
    out = np.zeros(q.shape, dtype=np.float32)
    keys, values = _read(pool, a.layer, gather_slots(a.tables, a.lens, c.block_size), None)
    cu = cu_seqlens(a.lens)
    for b in range(a.lens.shape[0]):
        rows = np.flatnonzero((a.row_seq == b) & (a.row_pos >= 0))
        if not rows.size:
            continue
        k = keys[cu[b]:cu[b + 1]].astype(np.float64)  # [L, H, D]
        v = values[cu[b]:cu[b + 1]].astype(np.float64)
        qs = q[rows].astype(np.float64).reshape(len(rows), c.num_kv_heads, group, c.head_dim)
        scores = np.einsum("rhgd,lhd->rhgl", qs, k) * a.scale  # [rows, H, group, L]
        if a.soft_cap:
            scores = a.soft_cap * np.tanh(scores / a.soft_cap)
        i, pos = np.arange(k.shape[0]), a.row_pos[rows][:, None]
        visible = i <= pos
        if a.window:
            visible &= i > pos - a.window
        scores = np.where(visible[:, None, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out[rows] = np.einsum("rhgl,lhd->rhgd", weights, v).reshape(len(rows), -1, c.head_dim)
    return out
