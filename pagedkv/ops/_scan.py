"""One-pass scans of index arrays for :mod:`pagedkv.ops.validate`.

Validation runs on every call, so at decode sizes (64 tokens) its fixed cost
matters as much as the kernel's. These scans are plain loops compiled by
numba (a few microseconds); where numba is missing they run as ordinary
Python, slower but with the same answers. Each returns ``(code, a, b)``:
code 0 means fine, any other code names the first problem found, with the
offending values in ``a`` and ``b``.
"""

from __future__ import annotations

import numpy as np

from ..geometry.layout import cdiv

SLOT_OUT_OF_RANGE, SLOT_REPEATED = 1, 2
LEN_NEGATIVE, LEN_TOO_LONG, TABLE_ENTRY_BAD = 1, 2, 3
BLOCK_OUT_OF_RANGE, DST_REPEATED, COPY_ONTO_ITSELF, DST_IS_SRC = 1, 2, 3, 4


def scan_slots(slots, num_slots, unique):
    """Slots must be ``< num_slots`` (negatives are padding); with ``unique``, no real slot twice."""
    for i in range(slots.shape[0]):
        if slots[i] >= num_slots:
            return SLOT_OUT_OF_RANGE, slots[i], 0
    if unique and slots.shape[0] > 1:
        s = np.sort(slots)
        for i in range(1, s.shape[0]):
            if s[i] >= 0 and s[i] == s[i - 1]:
                return SLOT_REPEATED, s[i], 0
    return 0, 0, 0


def scan_tables(tables, lens, block_size, num_blocks, nulls):
    """Lengths in ``0..max_blocks * block_size``; the entries a sequence uses are real blocks,
    except that sequence b's first ``nulls[b]`` entries may be -1 (null: freed out of a
    sliding window; ``nulls`` empty: none may). The fourth value is the lengths' total (int64;
    0 after an error), which the callers need and would otherwise sum again."""
    capacity = tables.shape[1] * block_size
    total = 0
    for b in range(lens.shape[0]):
        n = lens[b]
        if n < 0:
            return LEN_NEGATIVE, b, 0, 0
        if n > capacity:
            return LEN_TOO_LONG, b, 0, 0
        total += np.int64(n)
        skip = nulls[b] if nulls.shape[0] else 0
        for j in range(cdiv(n, block_size)):
            if j < skip and tables[b, j] == -1:
                continue
            if tables[b, j] < 0 or tables[b, j] >= num_blocks:
                return TABLE_ENTRY_BAD, b, j, 0
    return 0, 0, 0, total


def scan_copies(src, dst, num_src_blocks, num_dst_blocks, same_pool):
    """Block ids in range, distinct destinations, and within one pool no self-copy and no
    destination that is also a source (so the copies can run in any order)."""
    for i in range(src.shape[0]):
        if src[i] < 0 or src[i] >= num_src_blocks:
            return BLOCK_OUT_OF_RANGE, 0, src[i]
        if dst[i] < 0 or dst[i] >= num_dst_blocks:
            return BLOCK_OUT_OF_RANGE, 1, dst[i]
    d = np.sort(dst)
    for i in range(1, d.shape[0]):
        if d[i] == d[i - 1]:
            return DST_REPEATED, d[i], 0
    if same_pool:
        for i in range(src.shape[0]):
            if src[i] == dst[i]:
                return COPY_ONTO_ITSELF, src[i], 0
        for i in range(src.shape[0]):
            k = np.searchsorted(d, src[i])
            if k < d.shape[0] and d[k] == src[i]:
                return DST_IS_SRC, src[i], 0
    return 0, 0, 0


try:
    from numba import njit
except ImportError:  # pure Python: same answers, slower
    pass
else:
    cdiv = njit(inline="always", cache=True)(cdiv)  # the scans below call it compiled
    scan_slots = njit(cache=True)(scan_slots)
    scan_tables = njit(cache=True)(scan_tables)
    scan_copies = njit(cache=True)(scan_copies)
