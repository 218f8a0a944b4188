"""The routines as parallel CPU kernels compiled by ``numba.njit``.

Each public function validates exactly as the reference does (same checks,
same errors), then hands the checked arrays and the layout's strides (one
integer :class:`~pagedkv.layout.Strides` tuple) to a kernel. The kernels call
the helpers of :mod:`pagedkv.layout` compiled for the CPU, so the arithmetic
is the reference's, line for line; one kernel serves both layouts because
only the strides differ.

Kernels are compiled on first use (about a second each) and cached on disk
(``cache=True``), so a second process starts fast.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import layout, validate
from ..layout import K, V
from ..plan import Plan, check_attention, check_write, make_plan
from ..pool import KVPool
from ._host import new_outputs

NAME = "numba"
DEVICE = "cpu"

# The layout arithmetic, compiled for the CPU: the same source as the reference uses.
block_base = njit(inline="always", cache=True)(layout.block_base)
token_base = njit(inline="always", cache=True)(layout.token_base)
table_slot = njit(inline="always", cache=True)(layout.table_slot)


# The copies below are slice assignments: numba compiles them to a vectorised
# copy (several times faster than an element loop) with memmove semantics.

# Token buffers reach the kernels flattened to 1-D (``key.reshape(-1)``, a view):
# numba copies flat slices several times faster than rows of a 3-D array.

@njit(parallel=True, cache=True)
def write_kernel(data, layer, key, value, slots, s):
    """Store token t of the flat key/value at ``slots[t]``; negative slots are skipped."""
    num_kv_heads, head_dim = s.num_kv_heads, s.head_dim
    for t in prange(slots.shape[0]):
        slot = slots[t]
        if slot < 0:  # padding
            continue
        base = token_base(layer, K, slot, s)
        for h in range(num_kv_heads):
            row = base + h * s.head_stride
            src = (t * num_kv_heads + h) * head_dim
            data[row:row + head_dim] = key[src:src + head_dim]
            data[row + s.kv_stride:row + s.kv_stride + head_dim] = value[src:src + head_dim]


@njit(inline="always")
def _load_token(data, base, out_k, out_v, i, s):
    """Copy the token whose (head 0, dim 0) is at ``base`` into row i of the flat outputs."""
    num_kv_heads, head_dim = s.num_kv_heads, s.head_dim
    for h in range(num_kv_heads):
        row = base + h * s.head_stride
        dst = (i * num_kv_heads + h) * head_dim
        out_k[dst:dst + head_dim] = data[row:row + head_dim]
        out_v[dst:dst + head_dim] = data[row + s.kv_stride:row + s.kv_stride + head_dim]


@njit(parallel=True, cache=True)
def read_kernel(data, layer, slots, out_k, out_v, s):
    """Load the token at ``slots[t]`` into row t of the flat outputs; zeros for padding."""
    row_len = s.num_kv_heads * s.head_dim
    for t in prange(slots.shape[0]):
        slot = slots[t]
        if slot < 0:
            out_k[t * row_len:(t + 1) * row_len] = 0.0
            out_v[t * row_len:(t + 1) * row_len] = 0.0
            continue
        _load_token(data, token_base(layer, K, slot, s), out_k, out_v, t, s)


@njit(parallel=True, cache=True)
def gather_kernel(data, layer, tables, cu, out_k, out_v, s):
    """Row i of the packed output is token ``i - cu[b]`` of the sequence b with ``cu[b] <= i < cu[b+1]``."""
    for i in prange(cu[cu.shape[0] - 1]):
        b = np.searchsorted(cu, i, side="right") - 1  # skips empty sequences
        slot = table_slot(tables, b, i - cu[b], s.block_size)
        _load_token(data, token_base(layer, K, slot, s), out_k, out_v, i, s)


@njit(parallel=True, cache=True)
def move_blocks_kernel(src_data, dst_data, src, dst, s):
    """Copy block ``src[i]`` of src_data to ``dst[i]`` of dst_data, every layer, K and V."""
    halves = s.num_layers * 2
    for job in prange(src.shape[0] * halves):
        i = job // halves
        layer = (job % halves) // 2
        kv = job % 2
        s0 = block_base(layer, kv, src[i], s)
        d0 = block_base(layer, kv, dst[i], s)
        dst_data[d0:d0 + s.block_stride] = src_data[s0:s0 + s.block_stride]


# ---- the step API: plan once, run per layer --------------------------------------------------------

def plan(pool: KVPool, *, slot_mapping=None, block_tables=None, context_lens=None, query_lens=None) -> Plan:
    """Same contract as :func:`pagedkv.backends.reference.plan`."""
    return make_plan(pool, DEVICE, slot_mapping=slot_mapping, block_tables=block_tables,
                     context_lens=context_lens, query_lens=query_lens)


def write_step(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, plan: Plan) -> None:
    """Same contract as :func:`pagedkv.backends.reference.write_step`."""
    layer, w = check_write(plan, pool, layer)
    validate.step_tokens(pool, key, value, w.slot_mapping.shape[0])
    write_kernel(pool.data, layer, key.reshape(-1), value.reshape(-1), w.kernel_slots, pool.strides)


def attention_step(q: np.ndarray, pool: KVPool, layer: int, plan: Plan, *, scale: float | None = None,
                   sliding_window: int | None = None, soft_cap: float | None = None) -> np.ndarray:
    """Same contract as :func:`pagedkv.backends.reference.attention_step`, in float32."""
    layer, a = check_attention(plan, pool, layer)
    validate.queries(pool, q, a.num_rows, a.query_lens is None)
    opt = validate.attention_options(pool, scale, sliding_window, soft_cap)
    out = np.empty(q.shape, dtype=np.float32)
    # NHD keeps a token's heads together: one task takes them all, reading blocks in order
    heads_per_task = pool.config.num_kv_heads if pool.config.layout == "NHD" else 1
    attention_kernel(pool.data, layer, q, a.kernel_tables, a.kernel_row_seq, a.kernel_row_pos, out, opt.window,
                     np.float32(opt.scale), np.float32(opt.soft_cap), heads_per_task, pool.strides)
    return out


# ---- one-shot routines ------------------------------------------------------------------------------

def write(pool: KVPool, layer: int, key: np.ndarray, value: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Same contract as :func:`pagedkv.backends.reference.write`."""
    write_step(pool, layer, key, value, plan(pool, slot_mapping=slot_mapping))


def read(pool: KVPool, layer: int, slot_mapping: np.ndarray, *, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as :func:`pagedkv.backends.reference.read`."""
    layer, slot_mapping = validate.read_args(pool, layer, slot_mapping, out, DEVICE)
    out_k, out_v = new_outputs(pool, slot_mapping.shape[0], out)
    read_kernel(pool.data, layer, slot_mapping, out_k.reshape(-1), out_v.reshape(-1), pool.strides)
    return out_k, out_v


def gather(pool: KVPool, layer: int, block_tables: np.ndarray, context_lens: np.ndarray, *, out=None):
    """Same contract as :func:`pagedkv.backends.reference.gather`."""
    layer, block_tables, context_lens = validate.gather_args(pool, layer, block_tables, context_lens, out, DEVICE)
    cu = layout.cu_seqlens(context_lens)
    out_k, out_v = new_outputs(pool, int(cu[-1]), out)
    gather_kernel(pool.data, layer, block_tables, cu, out_k.reshape(-1), out_v.reshape(-1), pool.strides)
    return out_k, out_v, cu


def copy_blocks(pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Same contract as :func:`pagedkv.backends.reference.copy_blocks`."""
    src, dst = validate.copy_args(pool, pool, src, dst, DEVICE, DEVICE)
    move_blocks_kernel(pool.data, pool.data, src, dst, pool.strides)


def swap_blocks(src_pool: KVPool, dst_pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None:
    """Same contract as :func:`pagedkv.backends.reference.swap_blocks`."""
    src, dst = validate.copy_args(src_pool, dst_pool, src, dst, DEVICE, DEVICE)
    move_blocks_kernel(src_pool.data, dst_pool.data, src, dst, src_pool.strides)


@njit(parallel=True, fastmath=True, cache=True)
def attention_kernel(data, layer, q, tables, row_seq, row_pos, out, window, scale, cap, heads_per_task, s):
    """Online-softmax attention over the blocks, in float32; a task is one query row and
    ``heads_per_task`` K/V heads (all of them in layout NHD, one in HND), so that a task
    reads its part of each block front to back and each K/V row once.

    Per block: the scores of its visible positions for every query head of the
    task, then one rescale of each head's running max, sum and accumulator
    (the streaming softmax of FlashAttention), never a gathered copy of K/V.
    ``fastmath`` lets LLVM vectorise the dot products (it reorders float32 sums).
    """
    num_kv_heads, head_dim, block_size = s.num_kv_heads, s.head_dim, s.block_size
    pos_stride, head_stride = s.pos_stride, s.head_stride
    group = q.shape[1] // num_kv_heads
    width = heads_per_task * group  # query heads of one task
    minus_inf = np.float32(-np.inf)
    tasks_per_row = num_kv_heads // heads_per_task
    for task in prange(q.shape[0] * tasks_per_row):
        r = task // tasks_per_row
        h0 = (task - r * tasks_per_row) * heads_per_task
        pos = row_pos[r]
        if pos < 0:  # a sequence with no context
            out[r, h0 * group:h0 * group + width, :] = 0.0
            continue
        b = row_seq[r]
        start = max(0, pos - window + 1) if window > 0 else 0
        qs = np.empty((width, head_dim), dtype=np.float32)  # the task's queries, pre-scaled
        for w in range(width):
            for d in range(head_dim):
                qs[w, d] = q[r, h0 * group + w, d] * scale
        m = np.full(width, minus_inf, dtype=np.float32)
        denom = np.zeros(width, dtype=np.float32)  # running sum of the weights
        acc = np.zeros((width, head_dim), dtype=np.float32)
        scores = np.empty((width, block_size), dtype=np.float32)
        for j in range(start // block_size, pos // block_size + 1):
            first = j * block_size
            p0 = max(start, first)
            n = min(pos + 1, first + block_size) - p0
            skip = (p0 - first) * pos_stride  # positions of the block before the window
            k_base = block_base(layer, K, np.int64(tables[b, j]), s) + skip
            v_base = block_base(layer, V, np.int64(tables[b, j]), s) + skip
            for i in range(n):  # scores: each K row once, for every query head that reads it
                for hh in range(heads_per_task):
                    at = k_base + i * pos_stride + (h0 + hh) * head_stride
                    k = data[at:at + head_dim]
                    for g in range(group):
                        w = hh * group + g
                        dot = np.float32(0.0)
                        for d in range(head_dim):
                            dot += qs[w, d] * k[d]
                        if cap > 0:
                            dot = cap * np.tanh(dot / cap)
                        scores[w, i] = dot
            for w in range(width):  # fold the block into each head's running softmax
                m_new = m[w]
                for i in range(n):
                    m_new = max(m_new, scores[w, i])
                correction = np.exp(m[w] - m_new)
                total = np.float32(0.0)
                for i in range(n):
                    scores[w, i] = np.exp(scores[w, i] - m_new)
                    total += scores[w, i]
                denom[w] = denom[w] * correction + total
                m[w] = m_new
                for d in range(head_dim):
                    acc[w, d] *= correction
            for i in range(n):  # weighted values: each V row once
                for hh in range(heads_per_task):
                    at = v_base + i * pos_stride + (h0 + hh) * head_stride
                    v = data[at:at + head_dim]
                    for g in range(group):
                        w = hh * group + g
                        e = scores[w, i]
                        for d in range(head_dim):
                            acc[w, d] += e * v[d]
        for w in range(width):
            for d in range(head_dim):
                out[r, h0 * group + w, d] = acc[w, d] / denom[w]


def paged_attention(q: np.ndarray, pool: KVPool, layer: int, block_tables: np.ndarray, context_lens: np.ndarray,
                    *, scale: float | None = None, sliding_window: int | None = None,
                    soft_cap: float | None = None, query_lens: np.ndarray | None = None) -> np.ndarray:
    """Same contract as :func:`pagedkv.backends.reference.paged_attention`, in float32."""
    p = plan(pool, block_tables=block_tables, context_lens=context_lens, query_lens=query_lens)
    return attention_step(q, pool, layer, p, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
