"""The exact reference: every routine in plain numpy on the flat pool.

This is the truth the other backends are tested against, and it is written to
be read. Each routine turns its slots or blocks into flat offsets with the
arithmetic of :mod:`pagedkv.geometry.layout`, then moves numbers with one fancy-indexed
assignment. Nothing here is clever; speed lives in the numba and CUDA backends.

Every backend has the same functions: the one-shot routines (``write``,
``read``, ``gather``, ``copy_blocks``, ``swap_blocks``, ``paged_attention``),
and the step API a decode loop uses: ``plan`` once per step, then
``write_step`` and ``attention_step`` per layer (see :mod:`pagedkv.ops.plan`).
"""

from __future__ import annotations

import numpy as np

from ..geometry import formats, layout
from ..geometry.layout import K, V
from ..memory.pool import KVPool
from ..ops import validate
from ..ops.plan import Plan, check_attention, check_window, check_write, make_plan
from ._host import element_index, load_raw, new_outputs, read_raw, scale_index

NAME = "numpy"
DEVICE = "cpu"


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
    stored, scale = load_raw(pool, layer, kv, slots)
    if scale is None and pool.kv_scales is not None:  # fp8: read = decode(stored) * scale
        scale = pool.kv_scales[layer, kv]
    return formats.to_float32(pool.config.format, stored, scale)


# ---- the step API: plan once, run per layer --------------------------------------------------------

def plan(pool: KVPool, *, slot_mapping=None, block_tables=None, context_lens=None, query_lens=None,
         sliding_window=None) -> Plan:
    """Validate a step's index arrays once (see :func:`pagedkv.ops.plan.make_plan`)."""
    return make_plan(pool, DEVICE, slot_mapping=slot_mapping, block_tables=block_tables,
                     context_lens=context_lens, query_lens=query_lens, sliding_window=sliding_window)


def write_step(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, plan: Plan) -> None:
    """:func:`write` with the slot mapping of a :class:`~pagedkv.ops.plan.Plan`."""
    key, value = formats.widen_input(key), formats.widen_input(value)
    layer, w = check_write(plan, pool, layer)
    slots = w.slot_mapping
    validate.step_tokens(pool, key, value, slots.shape[0])
    real = slots >= 0  # padding tokens are skipped
    for kv, new in ((K, key), (V, value)):
        _store(pool, layer, kv, slots[real], new[real])


def attention_step(q: np.ndarray, pool: KVPool, layer: int, plan: Plan, *, scale: float | None = None,
                   sliding_window: int | None = None, soft_cap: float | None = None) -> np.ndarray:
    """:func:`paged_attention` with the block tables and query rows of a :class:`~pagedkv.ops.plan.Plan`.

    This reference does the plain math in float64 on a gathered copy, and
    rounds the result to float32 once; the fast backends stream over the
    blocks in float32 (see :mod:`pagedkv.testing.tolerance` for the tolerance between them).
    """
    layer, a = check_attention(plan, pool, layer)
    validate.queries(pool, q, a.num_rows, a.query_lens is None)
    opt = validate.attention_options(pool, scale, sliding_window, soft_cap)
    check_window(a, opt.window)
    c = pool.config
    group = q.shape[1] // c.num_kv_heads
    out = np.zeros(q.shape, dtype=np.float32)
    tables, lens = a.block_tables, a.context_lens
    keys, values = _read(pool, layer, layout.gather_slots(tables, lens, c.block_size), None)
    cu = layout.cu_seqlens(lens)
    for r in np.flatnonzero(a.row_pos >= 0):
        b, pos = a.row_seq[r], int(a.row_pos[r])
        first = max(0, pos - opt.window + 1) if opt.window else 0
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


# ---- one-shot routines ------------------------------------------------------------------------------

def write(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Store ``key[t]`` and ``value[t]`` at slot ``slot_mapping[t]`` of ``layer`` (reshape_and_cache).

    Args:
        pool: a CPU :class:`KVPool`.
        layer: ``0 <= layer < num_layers``.
        key, value: float32 ``[T, H, D]``, C-contiguous, stored in the pool's format. float16
            and bfloat16 are taken too (widened exactly first, see
            :func:`pagedkv.geometry.formats.widen_input`): numpy float16, ml_dtypes bfloat16, or
            uint16 arrays of bfloat16 bit patterns (torch: ``t.view(torch.uint16)``).
        slot_mapping: int64 ``[T]``; a negative slot marks padding and its token is skipped.

    Raises:
        PagedKVError: a wrong dtype, shape or contiguity, a slot outside the
            pool, or two tokens aimed at one slot. The pool is then unchanged.
    """
    write_step(pool, layer, key, value, plan(pool, slot_mapping=slot_mapping))


def _read(pool: KVPool, layer: int, slots: np.ndarray, out) -> tuple[np.ndarray, np.ndarray]:
    real = slots >= 0
    result = new_outputs(pool, slots.shape[0], out)
    for kv, x in zip((K, V), result, strict=True):
        x[~real] = 0.0  # padding reads as zeros
        x[real] = _load(pool, layer, kv, slots[real])
    return result


def read(pool: KVPool, layer: int, slot_mapping: np.ndarray, *, out=None, raw: bool = False):
    """Load the keys and values stored at ``slot_mapping`` (the inverse of :func:`write`).

    Args:
        slot_mapping: int64 ``[T]``; a slot may repeat; a negative slot gives zeros.
        out: optional ``(key, value)`` float32 ``[T, H, D]`` arrays to fill
            instead of allocating (a decode loop reuses them).
        raw: return the stored elements (and int8 scales) undecoded, as a
            :class:`~pagedkv.geometry.formats.RawKV`; padding rows are zero bits.

    Returns:
        ``(key, value)``, float32 ``[T, H, D]`` each, decoded from the pool's
        format (``out`` itself if given); or a ``RawKV`` with ``raw=True``.
    """
    if raw:
        validate.no_out_with_raw(out)
    layer, slot_mapping = validate.read_args(pool, layer, slot_mapping, out, DEVICE)
    if raw:
        return read_raw(pool, layer, slot_mapping)
    return _read(pool, layer, slot_mapping, out)


def gather(pool: KVPool, layer: int, block_tables: np.ndarray, context_lens: np.ndarray, *, out=None,
           raw: bool = False):
    """Copy each sequence's keys and values, in token order, into packed buffers.

    Args:
        block_tables: int32 ``[B, max_blocks]``: sequence b's token p lives in
            block ``block_tables[b, p // block_size]``. Entries past a
            sequence's length are never read; a block may repeat.
        context_lens: int32 ``[B]``, tokens cached per sequence (0 allowed).
        out: optional ``(key, value)`` float32 ``[sum(context_lens), H, D]``
            arrays to fill instead of allocating.

        raw: return ``(RawKV, cu_seqlens)``: the stored elements (and int8
            scales) undecoded, as :func:`read` does.

    Returns:
        ``(key, value, cu_seqlens)``: float32 ``[sum(context_lens), H, D]``
        twice, decoded, and int32 ``[B + 1]`` with sequence b at rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]``.
    """
    if raw:
        validate.no_out_with_raw(out)
    layer, block_tables, context_lens, _ = validate.gather_args(pool, layer, block_tables, context_lens, out, DEVICE)
    slots = layout.gather_slots(block_tables, context_lens, pool.config.block_size)
    if raw:
        return read_raw(pool, layer, slots), layout.cu_seqlens(context_lens)
    key, value = _read(pool, layer, slots, out)
    return key, value, layout.cu_seqlens(context_lens)


def _move_blocks(src_pool: KVPool, dst_pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer, K and V, with their int8 scales."""
    s = src_pool.strides
    within = np.arange(s.block_stride)  # a block is one contiguous run in either layout
    scales_within = np.arange(s.block_size * s.num_kv_heads)  # and so are its scales
    for layer in range(s.num_layers):
        for kv in (K, V):
            src_base = layout.block_base(layer, kv, src, s)
            dst_base = layout.block_base(layer, kv, dst, s)
            dst_pool.host[dst_base[:, None] + within] = src_pool.host[src_base[:, None] + within]
            if src_pool.scales is not None and dst_pool.scales is not None:
                src_at = layout.block_scale_base(layer, kv, src, s)[:, None] + scales_within
                dst_at = layout.block_scale_base(layer, kv, dst, s)[:, None] + scales_within
                dst_pool.host_scales[dst_at] = src_pool.host_scales[src_at]


def copy_blocks(pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy whole blocks ``src[i] -> dst[i]``, every layer, K and V (copy-on-write, fork).

    Args:
        src, dst: int64 ``[N]`` block ids. The copies happen as if at once, so
            no block may be copied onto itself, be the destination of two
            copies, or be both a source and a destination.
    """
    src, dst = validate.copy_args(pool, pool, src, dst, DEVICE, DEVICE)
    _move_blocks(pool, pool, src, dst)


def swap_blocks(src_pool: KVPool, dst_pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy blocks ``src[i]`` of ``src_pool`` to ``dst[i]`` of ``dst_pool`` (offload, reload).

    The pools must have the same geometry; destinations must be distinct. With
    one pool as both, the rules of :func:`copy_blocks` apply.
    """
    src, dst = validate.copy_args(src_pool, dst_pool, src, dst, DEVICE, DEVICE)
    _move_blocks(src_pool, dst_pool, src, dst)


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

    Non-finite K/V (an fp8_e4m3 pool stores NaN, a model may write inf), the same in every
    backend: a position a query does not see contributes nothing, whatever it holds; a
    visible NaN in K makes that query head's whole output row NaN, and a visible NaN in V
    the output numbers it is weighted into (every query head of its K/V head, in that
    dimension). A visible infinity is carried by IEEE arithmetic (``inf - inf`` is NaN).

    Args:
        q: float32 ``[B, Hq, D]`` (decode: row b is the newest token of
            sequence b, whose own K/V is already written, at position
            ``context_lens[b] - 1``), or ``[sum(query_lens), Hq, D]`` with
            ``query_lens``. ``Hq`` is a multiple of the cache's ``H``; query
            head ``hq`` reads K/V head ``hq // (Hq // H)`` (grouped-query
            attention; MQA and MHA are the edge cases).
        block_tables, context_lens: as for :func:`gather`.
        scale: defaults to ``1 / sqrt(D)``.
        sliding_window: keep only the last W positions (the query's own included). Table
            entries wholly before the window of a sequence's first query are not read and
            may be -1 (blocks a sliding-window layer group freed).
        soft_cap: apply ``cap * tanh(s / cap)`` to the scaled scores.
        query_lens: int32 ``[B]``: sequence b's queries are its last
            ``query_lens[b]`` positions, each attending causally (prefill,
            chunked prefill, speculative verification).

    Returns:
        float32 ``[rows, Hq, D]``; zeros for a sequence with no context.
    """
    p = plan(pool, block_tables=block_tables, context_lens=context_lens, query_lens=query_lens,
             sliding_window=sliding_window)
    return attention_step(q, pool, layer, p, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
