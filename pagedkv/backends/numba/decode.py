"""Decode attention on the CPU: one query row per task, its K/V streamed once, sums in registers.

A task is one query row (one sequence's newest token, or one row of a short chunk) and
``heads_per_task`` K/V heads (all of them in layout NHD, where a token's heads lie together;
one in HND), with every query head of their groups (grouped-query attention). Per block and
K/V head:

    scores[w, i] = qs[w] . k_i     two query vectors against two keys per pass, four sums
                                   over D in registers: a key row is loaded once for two
                                   queries, a query once for two keys
    online softmax                 one rescale of each query's max, sum and accumulator per
                                   block (FlashAttention's streaming softmax)
    acc[w] += sum_i e[w, i] v_i    two accumulator rows take four value rows per pass, so an
                                   accumulator is loaded and stored once per four rows

While a block is computed, the next block's rows are prefetched (:func:`prefetch_block`): the
CPU's own prefetchers follow a run of rows only within a 4 KiB page and cannot know which
block comes next, and a task's work on one block is too little to hide the wait for the next.
A float32 block's prefetches are issued at once when the work on the block before begins: its
rows are read where they lie, and at four bytes a number the call is bound by memory, so the
longest lead wins. A narrow block's (half or a quarter of the bytes, the call bound about as
much by the arithmetic) are spread over that work, a part with each head's scores and values
(:func:`prefetch_part`), so that they do not compete with the decoding for the load ports.

A float32 pool's rows are used where they lie; a narrow pool's rows of a block (all the
task's heads) are decoded once each into a small buffer, in the order they lie in memory
(:func:`stage_heads`), never a decoded copy of the pool: decoding head by head would read
each head's rows a token apart, a new page per row, which the CPU's prefetchers do not follow.

Four independent sums over D keep the vector units busy, where one chain of dependent vector
additions would be bound by their latency, and each key row is loaded once for every query
head reading it. A group's query vectors are padded to an even count with zeros (their
results are never written out), and a block's odd last rows take one-row passes, so nothing
past a block's visible rows is ever read.

The float liberties are :data:`~pagedkv.backends.numba.prefill.FASTMATH`'s (sums
reassociated so that they vectorise; infinities kept, since the running max starts at -inf);
the tolerance against the float64 reference is :mod:`pagedkv.testing.tolerance`'s.

As for ``prefill``, numba's on-disk cache of this module's kernel is keyed on this file:
after editing a helper it inlines (``codecs``, ``prefill``), delete
``pagedkv/backends/numba/__pycache__/*.nbi`` / ``*.nbc``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ...geometry.layout import K, V
from .codecs import TOKEN, decode_row, prefetch
from .common import FASTMATH, add_four_rows, block_base, dot_2x2, fast_exp, row_scale, window_start


def stage_heads(data, at, n, heads, pos_stride, head_dim, buf, layer, kv, slot0, h0, s, codec, kind, tensor_scale,
                scales):
    """Where the float32 values of ``n`` rows of ``heads`` consecutive heads of a block lie, as
    ``(array, base, stride)``: head ``h0 + hh``'s row ``i`` is ``array[base + i * stride + hh *
    head_dim:][:head_dim]``. The heads of a row lie together (layout NHD, or one head alone), so
    a float32 pool's rows are read where they are (``data, at, pos_stride``: no copy), and a
    narrow pool's are decoded, each once, into ``buf`` in the order they lie in memory (one
    sequential stream, which the CPU's prefetchers follow; head by head, the rows of a head lie
    a token apart and each row starts a new page), with their scales (fp8's per layer, int8's
    per row): ``(buf, 0, heads * head_dim)``."""


@overload(stage_heads, inline="always")
def _stage_heads(data, at, n, heads, pos_stride, head_dim, buf, layer, kv, slot0, h0, s, codec, kind, tensor_scale,
                 scales):
    if data.dtype == types.float32:
        def in_place(data, at, n, heads, pos_stride, head_dim, buf, layer, kv, slot0, h0, s, codec, kind,
                     tensor_scale, scales):
            return data, np.int64(at), np.int64(pos_stride)
        return in_place

    def decoded(data, at, n, heads, pos_stride, head_dim, buf, layer, kv, slot0, h0, s, codec, kind, tensor_scale,
                scales):
        # kv as int64, not the literal K or V (each literal would compile a function of its own)
        stage_decoded(data, at, n, heads, pos_stride, head_dim, buf, layer, np.int64(kv), slot0, h0, s, codec, kind,
                      tensor_scale, scales)
        return buf, np.int64(0), np.int64(heads * head_dim)
    return decoded


# a call of its own, not inlined: see codecs on what inlining a narrow format's decoder costs
@njit(cache=True)
def stage_decoded(data, at, n, heads, pos_stride, head_dim, buf, layer, kv, slot0, h0, s, codec, kind, tensor_scale,
                  scales):
    """A narrow pool's ``n`` rows of ``heads`` heads decoded into ``buf``, in memory order (see
    :func:`stage_heads`)."""
    width = heads * head_dim
    if kind != TOKEN and pos_stride == width:  # the n rows are one run: decoded in one pass
        decode_row(data, at, n * width, buf, 0, codec, kind, tensor_scale)
    else:
        for i in range(n):
            for hh in range(heads):
                decode_row(data, at + i * pos_stride + hh * head_dim, head_dim, buf, i * width + hh * head_dim,
                           codec, kind, row_scale(layer, kv, slot0 + i, h0 + hh, s, kind, tensor_scale, scales))


@njit(inline="always")
def prefetch_part(data, layer, kv, block, h0, heads, s, part, parts):
    """Prefetch part ``part`` of ``parts`` of the K or V rows (``kv``) of :func:`prefetch_block`, so that
    a block's prefetches are spread over the work on the one before, not issued in one burst."""
    span = (s.block_size - 1) * s.pos_stride + heads * s.head_dim
    line = 64 // data.itemsize
    chunk = (span + parts * line - 1) // (parts * line) * line
    base = block_base(layer, kv, block, s) + h0 * s.head_stride
    for x in range(part * chunk, min(span, (part + 1) * chunk), line):
        prefetch(data, base + x)


@njit(inline="always")
def prefetch_block(data, layer, block, h0, heads, s):
    """Prefetch the K and V rows of ``heads`` heads from ``h0`` of one block, a cache line
    (64 bytes) at a time: they span ``(block_size - 1) * pos_stride + heads * head_dim`` stored
    elements from the first, in either layout."""
    for kv in range(2):
        prefetch_part(data, layer, kv, block, h0, heads, s, 0, 1)


@njit(inline="always")
def scores_two_keys(qs, w0, w1, k0, k1, scores, i):
    """``scores[w, i]`` and ``scores[w, i + 1]`` for the query vectors ``w0 <= w < w1`` (an even
    count) against the keys ``k0`` and ``k1``."""
    for w in range(w0, w1, 2):
        scores[w, i], scores[w, i + 1], scores[w + 1, i], scores[w + 1, i + 1] = dot_2x2(qs[w], qs[w + 1], k0, k1)


@njit(inline="always")
def values_four_rows(scores, w0, w1, v0, v1, v2, v3, acc, i):
    """``acc[w] += sum over c < 4 of scores[w, i + c] * v_c`` for ``w0 <= w < w1`` (an even count)."""
    for w in range(w0, w1, 2):
        add_four_rows(acc[w], acc[w + 1], scores, w, i, v0, v1, v2, v3)


@njit(inline="always")
def _scores_one_key(qs, w0, w1, k0, scores, i):
    """``scores[w, i]`` for ``w0 <= w < w1`` against the key ``k0``: a block's odd last row."""
    for w in range(w0, w1, 2):
        q0, q1 = qs[w], qs[w + 1]
        a0 = b0 = np.float32(0.0)
        for d in range(q0.shape[0]):
            u = k0[d]
            a0 += q0[d] * u
            b0 += q1[d] * u
        scores[w, i], scores[w + 1, i] = a0, b0


@njit(inline="always")
def _values_one_row(scores, w0, w1, v0, acc, i):
    """``acc[w] += scores[w, i] * v0`` for ``w0 <= w < w1``: a block's last rows, one at a time."""
    for w in range(w0, w1, 2):
        a, b = acc[w], acc[w + 1]
        x0, y0 = scores[w, i], scores[w + 1, i]
        for d in range(a.shape[0]):
            p = v0[d]
            a[d] += x0 * p
            b[d] += y0 * p


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def decode_attention_kernel(data, layer, q, tables, row_seq, row_pos, out, window, scale, cap, heads_per_task, s,
                            codec, kind, k_scale, v_scale, scales):
    """Online-softmax attention of each query row over its sequence's blocks, in float32; see the
    module docstring. ``row_pos[r]`` is the row's position (its last visible key), -1 for a
    sequence with no context (zeros out)."""
    num_kv_heads, head_dim, block_size = s.num_kv_heads, s.head_dim, s.block_size
    pos_stride, head_stride = s.pos_stride, s.head_stride
    group = q.shape[1] // num_kv_heads
    gpad = group + group % 2  # a K/V head's query vectors, padded to an even count
    width = heads_per_task * gpad
    minus_inf = np.float32(-np.inf)
    tasks_per_row = num_kv_heads // heads_per_task
    for task in prange(q.shape[0] * tasks_per_row):
        r = task // tasks_per_row
        h0 = (task - r * tasks_per_row) * heads_per_task
        pos = row_pos[r]
        if pos < 0:  # a sequence with no context
            out[r, h0 * group:(h0 + heads_per_task) * group, :] = 0.0
            continue
        b = row_seq[r]
        start = window_start(pos, window)
        qs = np.zeros((width, head_dim), dtype=np.float32)  # the task's queries, pre-scaled, padded
        for hh in range(heads_per_task):
            for g in range(group):
                for d in range(head_dim):
                    qs[hh * gpad + g, d] = q[r, (h0 + hh) * group + g, d] * scale
        m = np.full(width, minus_inf, dtype=np.float32)
        denom = np.zeros(width, dtype=np.float32)  # running sum of the weights
        acc = np.zeros((width, head_dim), dtype=np.float32)
        scores = np.zeros((width, block_size), dtype=np.float32)
        # the task's heads' decoded rows of one block (narrow formats; a float32 pool's are used in place)
        buf = np.empty(block_size * heads_per_task * head_dim, dtype=np.float32)
        last = pos // block_size
        for j in range(start // block_size, last + 1):
            following = np.int64(tables[b, j + 1]) if j < last else np.int64(-1)  # prefetched while j is worked on
            if data.itemsize == 4 and following >= 0:  # float32: all of the next block now (see the docstring)
                prefetch_block(data, layer, following, h0, heads_per_task, s)
                following = np.int64(-1)
            first = j * block_size
            p0 = max(start, first)
            n = min(pos + 1, first + block_size) - p0
            skip = (p0 - first) * pos_stride  # positions of the block before the window
            block = np.int64(tables[b, j])
            k_base = block_base(layer, K, block, s) + skip
            v_base = block_base(layer, V, block, s) + skip
            slot0 = block * block_size + p0 - first  # the slot of position p0
            src, base0, stride = stage_heads(data, k_base + h0 * head_stride, n, heads_per_task, pos_stride, head_dim,
                                             buf, layer, K, slot0, h0, s, codec, kind, k_scale, scales)
            for hh in range(heads_per_task):  # scores: each K row once, for every query head reading it
                if following >= 0:
                    prefetch_part(data, layer, K, following, h0, heads_per_task, s, hh, heads_per_task)
                w0, base = hh * gpad, base0 + hh * head_dim
                i = 0
                while i + 1 < n:
                    at = base + i * stride
                    scores_two_keys(qs, w0, w0 + gpad, src[at:at + head_dim],
                                     src[at + stride:at + stride + head_dim], scores, i)
                    i += 2
                if i < n:
                    at = base + i * stride
                    _scores_one_key(qs, w0, w0 + gpad, src[at:at + head_dim], scores, i)
            for w in range(width):  # fold the block into each query's running softmax
                if w % gpad >= group:
                    continue  # a padding vector: its results are never read
                sw = scores[w]
                m_new = m[w]
                for i in range(n):
                    if cap > 0:
                        sw[i] = cap * np.tanh(sw[i] / cap)
                    m_new = max(m_new, sw[i])
                correction = np.exp(m[w] - m_new)
                total = np.float32(0.0)
                for i in range(n):
                    e = fast_exp(sw[i] - m_new)
                    sw[i] = e
                    total += e
                denom[w] = denom[w] * correction + total
                m[w] = m_new
                acc[w, :] *= correction
            src, base0, stride = stage_heads(data, v_base + h0 * head_stride, n, heads_per_task, pos_stride, head_dim,
                                             buf, layer, V, slot0, h0, s, codec, kind, v_scale, scales)
            for hh in range(heads_per_task):  # weighted values: each V row once
                if following >= 0:
                    prefetch_part(data, layer, V, following, h0, heads_per_task, s, hh, heads_per_task)
                w0, base = hh * gpad, base0 + hh * head_dim
                i = 0
                while i + 3 < n:
                    at = base + i * stride
                    values_four_rows(scores, w0, w0 + gpad, src[at:at + head_dim],
                                      src[at + stride:at + stride + head_dim],
                                      src[at + 2 * stride:at + 2 * stride + head_dim],
                                      src[at + 3 * stride:at + 3 * stride + head_dim], acc, i)
                    i += 4
                while i < n:
                    at = base + i * stride
                    _values_one_row(scores, w0, w0 + gpad, src[at:at + head_dim], acc, i)
                    i += 1
        for hh in range(heads_per_task):
            for g in range(group):
                w = hh * gpad + g
                for d in range(head_dim):
                    out[r, (h0 + hh) * group + g, d] = acc[w, d] / denom[w]
