"""Prefill and chunked-prefill attention on the CPU, tiled as FlashAttention-2 does.

The decode kernel of :mod:`pagedkv.backends.numba` takes one query row per
task and streams that row's whole context: a 2,048-token prefill would read every
K/V row about 2,048 times. Here a task is a *tile*: up to ``TILE_ROWS`` consecutive
query rows of one sequence and one K/V head, with all the query heads that read
that head (grouped-query attention): its query vectors ``qs [W, D]``, pre-scaled. The task
streams each block of the tile's context once: it copies (or decodes) the block's K and V
rows into ``kb`` and ``vb [n, D]``, then

    st[i, w]  = qs[w] . kb[i]                          (two queries by two keys, sums over D)
    online softmax along w: the running maximum, denominator and accumulator of each
                 query vector, rescaled only when its maximum moves
    acc[w, :] += sum_i st[i, w] * vb[i, :]             (vectorised over D)

with each row's causal limit, sliding window and soft cap applied to its own scores. The
scores are kept transposed (one row a position) because the softmax is then a handful of
loops over the tile's W query vectors (``TILE_ROWS`` x the group, 128 for Llama-3's shape),
which LLVM vectorises, ``exp`` included; along a block's 16 positions each loop would be too
short for a vector loop and ``exp`` would run one number at a time. The rows are copied out
of the pool even for float32: a block's rows of one head lie a page apart in NHD (``H * D *
4`` bytes), so read in place they would fall into the same few sets of the L1 cache and evict
each other; the next block's rows are prefetched while a block is worked on. A
narrow-format pool's rows are decoded once per tile and
block instead of once per query row. The numbers are the decode kernel's (float32
streaming softmax); the tolerance against the float64 reference is the same
(:mod:`pagedkv.testing.tolerance`).

Tasks are numbered so that consecutive ids alternate cheap and dear tiles
(the first and last of a causal prefill): numba's ``prange`` hands each thread
a contiguous range of ids, and causal tiles cost in proportion to their position.

The building blocks it shares with the decode kernel (``fast_exp``, ``dot_2x2``, the layout
helpers compiled for the CPU) are in :mod:`.common`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ...geometry.layout import K, V
from .codecs import load_row, prefetch
from .common import FASTMATH, add_four_rows, block_base, dot_2x2, fast_exp, row_scale, window_start

TILE_ROWS = 32  #: query rows (positions) of one sequence per task


def tiles(query_lens: np.ndarray, tile_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(first_row, num_rows)`` of each tile: every sequence's query rows (consecutive in
    ``q``) cut into runs of at most ``tile_rows`` (default: :data:`TILE_ROWS`, read at each call,
    so that a test can make tiles small); sequences without queries give none."""
    tile_rows = TILE_ROWS if tile_rows is None else tile_rows
    starts = np.concatenate([[0], np.cumsum(query_lens, dtype=np.int64)[:-1]])
    per_seq = -(-query_lens.astype(np.int64) // tile_rows)
    seq = np.repeat(np.arange(query_lens.shape[0]), per_seq)
    k = np.arange(seq.shape[0]) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    first = starts[seq] + k * tile_rows
    return first, np.minimum(query_lens[seq] - k * tile_rows, tile_rows).astype(np.int64)


@njit(inline="always")
def prefetch_rows(data, layer, block, h, s):
    """Prefetch head ``h``'s K and V rows of one block, a cache line (64 bytes) at a time."""
    line = 64 // data.itemsize  # stored elements a line
    for kv in range(2):
        base = block_base(layer, kv, block, s) + h * s.head_stride
        for i in range(s.block_size):
            for x in range(0, s.head_dim, line):
                prefetch(data, base + i * s.pos_stride + x)


@njit(inline="always")
def _scores(qs, kb, st, width, n):
    """``st[i, w] = qs[w] . kb[i]`` for ``w < width``, ``i < n`` (both even / multiples of 4,
    padded): two query vectors against two keys at a time. The scores are kept transposed, one
    row a position, so that the softmax runs along the tile's query vectors (see below)."""
    for w in range(0, width, 2):
        q0, q1 = qs[w], qs[w + 1]
        for i in range(0, n, 2):
            st[i, w], st[i + 1, w], st[i, w + 1], st[i + 1, w + 1] = dot_2x2(q0, q1, kb[i], kb[i + 1])


@njit(inline="always")
def _weighted_values(et, vb, acc, width, n):
    """``acc[w] += sum_i et[i, w] * vb[i]`` for ``w < width``, ``i < n`` (padded as for _scores)."""
    et_rows = et.T  # a view: et_rows[w, i] is et[i, w]
    for w in range(0, width, 2):
        a, b = acc[w], acc[w + 1]
        for i in range(0, n, 4):
            add_four_rows(a, b, et_rows, w, i, vb[i], vb[i + 1], vb[i + 2], vb[i + 3])


@njit(inline="always")
def _online_softmax(st, m, m_new, denom, acc, lo, hi, width, n, cap):
    """One block's step of the streaming softmax for every query vector of the tile at once.

    ``st[i, w]`` holds query vector ``w``'s score for position ``i`` of the block, and only
    ``lo[w] <= i < hi[w]`` is visible to it (its causal limit and window). Every loop runs along
    ``w``, the tile's query vectors, whose count is the same for every block: along the
    block's positions a loop would be 16 long, too short for LLVM's vectorised loops, and
    ``exp`` would run one number at a time. Scores become weights ``e^(s - m_new)`` (0 where
    not visible); the running maximum ``m``, the denominator and the accumulator row are
    rescaled by ``e^(m - m_new)``, which is skipped for the rows whose maximum did not move.
    """
    minus_inf = np.float32(-np.inf)
    if cap > 0:
        for i in range(n):
            for w in range(width):
                st[i, w] = cap * np.tanh(st[i, w] / cap)
    m_new[:width] = m[:width]
    for i in range(n):
        row = st[i]
        for w in range(width):
            m_new[w] = max(m_new[w], row[w]) if lo[w] <= i < hi[w] else m_new[w]
    for w in range(width):
        mw = m_new[w]
        correction = fast_exp(m[w] - mw) if mw > minus_inf else np.float32(1.0)  # nothing seen yet: 1
        m[w] = mw
        if correction != np.float32(1.0):
            denom[w] *= correction
            acc[w, :] *= correction
    for i in range(n):
        row = st[i]
        for w in range(width):
            e = fast_exp(row[w] - m_new[w])
            e = e if lo[w] <= i < hi[w] else np.float32(0.0)
            row[w] = e
            denom[w] += e


@njit(inline="always")
def _hide_masked_non_finite(vb, saved, hid, lo, hi, width, n):
    """Set aside the block's V rows holding a NaN or an infinity that some query vector of the tile
    must not see (a weight of 0 times NaN is still NaN): such a row moves to ``saved`` and reads 0 in
    ``vb`` (``hid[i]`` set), and :func:`_add_hidden_rows` adds it back for the vectors that see it.
    Only rows outside what every vector sees are looked at (the diagonal's and the window's
    edges), so the usual block costs a few comparisons. Returns whether any row was set aside."""
    all_lo, all_hi = 0, n  # positions every query vector of the tile sees
    for w in range(width):
        all_lo = max(all_lo, lo[w])
        all_hi = min(all_hi, hi[w])
    hidden = False
    for i in range(n):
        if all_lo <= i < all_hi:
            continue
        finite = True
        for d in range(vb.shape[1]):
            finite = finite and math.isfinite(vb[i, d])
        if not finite:
            saved[i, :] = vb[i, :]
            vb[i, :] = 0.0
            hid[i] = True
            hidden = True
    return hidden


@njit(inline="always")
def _add_hidden_rows(et, saved, hid, acc, lo, hi, width, n):
    """The rows :func:`_hide_masked_non_finite` set aside, weighted into the vectors that see them."""
    for i in range(n):
        if hid[i]:
            for w in range(width):
                if lo[w] <= i < hi[w]:
                    acc[w, :] += et[i, w] * saved[i, :]
            hid[i] = False


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def tiled_attention_kernel(data, layer, q, tables, row_seq, row_pos, tile_first, tile_rows, out, window, scale,
                           cap, s, codec, kind, k_scale, v_scale, scales):
    """Attention of every tile's query rows over their sequence's blocks; see the module docstring.
    Buffers are padded (query vectors to an even count, positions to a multiple of 4) with
    zeros whose weights are 0, so that the inner loops run without remainders."""
    num_kv_heads, head_dim, block_size = s.num_kv_heads, s.head_dim, s.block_size
    pos_stride, head_stride = s.pos_stride, s.head_stride
    group = q.shape[1] // num_kv_heads
    num_tiles = tile_first.shape[0]
    npad = (block_size + 3) // 4 * 4
    minus_inf = np.float32(-np.inf)
    for task in prange(num_tiles * num_kv_heads):
        pair, h = task // num_kv_heads, task % num_kv_heads
        t = pair // 2 if pair % 2 == 0 else num_tiles - 1 - pair // 2  # 0, n-1, 1, n-2, ...
        r0, nr = tile_first[t], tile_rows[t]
        first_pos, last_pos = row_pos[r0], row_pos[r0 + nr - 1]
        if first_pos < 0:  # a sequence with no context
            out[r0:r0 + nr, h * group:(h + 1) * group, :] = 0.0
            continue
        b, width = row_seq[r0], nr * group
        wpad = width + width % 2
        qs = np.zeros((wpad, head_dim), dtype=np.float32)  # the tile's query vectors, pre-scaled
        pos = np.full(wpad, -1, dtype=np.int64)  # each one's position (-1: padding, sees nothing)
        for w in range(width):
            pos[w] = row_pos[r0 + w // group]
            for d in range(head_dim):
                qs[w, d] = q[r0 + w // group, h * group + w % group, d] * scale
        m = np.full(wpad, minus_inf, dtype=np.float32)
        m_new = np.empty(wpad, dtype=np.float32)
        denom = np.zeros(wpad, dtype=np.float32)
        acc = np.zeros((wpad, head_dim), dtype=np.float32)
        st = np.zeros((npad, wpad), dtype=np.float32)  # scores, then weights: one row a position
        lo = np.zeros(wpad, dtype=np.int64)
        hi = np.zeros(wpad, dtype=np.int64)
        kb = np.zeros((npad, head_dim), dtype=np.float32)  # a block's keys and values, zero-padded
        vb = np.zeros((npad, head_dim), dtype=np.float32)
        row = np.empty(head_dim, dtype=np.float32)
        saved = np.zeros((npad, head_dim), dtype=np.float32)  # V rows set aside (_hide_masked_non_finite)
        hid = np.zeros(npad, dtype=np.bool_)
        start = window_start(first_pos, window)  # the first row's window reaches furthest
        for j in range(start // block_size, last_pos // block_size + 1):
            first = j * block_size
            n = min(last_pos + 1, first + block_size) - first
            block = np.int64(tables[b, j])
            k_base = block_base(layer, K, block, s) + h * head_stride
            v_base = block_base(layer, V, block, s) + h * head_stride
            slot0 = block * block_size
            for i in range(n):  # each K and V row of the block once per tile
                kb[i, :] = load_row(data, k_base + i * pos_stride, head_dim, row, codec, kind,
                                    row_scale(layer, K, slot0 + i, h, s, kind, k_scale, scales))[:head_dim]
                vb[i, :] = load_row(data, v_base + i * pos_stride, head_dim, row, codec, kind,
                                    row_scale(layer, V, slot0 + i, h, s, kind, v_scale, scales))[:head_dim]
            kb[n:, :] = 0.0
            vb[n:, :] = 0.0
            if j < last_pos // block_size:  # the next block's rows come in while this one is worked on
                prefetch_rows(data, layer, np.int64(tables[b, j + 1]), h, s)
            for w in range(wpad):  # the positions of this block each query vector sees
                lo[w] = max(window_start(pos[w], window) - first, 0)
                hi[w] = min(pos[w] + 1 - first, n)
            hidden = _hide_masked_non_finite(vb, saved, hid, lo, hi, width, n)
            _scores(qs, kb, st, wpad, npad)
            _online_softmax(st, m, m_new, denom, acc, lo, hi, wpad, npad, cap)
            _weighted_values(st, vb, acc, wpad, npad)
            if hidden:
                _add_hidden_rows(st, saved, hid, acc, lo, hi, width, n)
        for w in range(width):
            r, hq = r0 + w // group, h * group + w % group
            for d in range(head_dim):
                out[r, hq, d] = acc[w, d] / denom[w]
